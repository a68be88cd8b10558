"""The multi-process harness itself: results, errors with tracebacks, no hangs."""

import os
import time

import pytest

from dist_util import START_METHOD, DistError, run_dist
from parallel.mesh import ParallelConfig, init_mesh

pytestmark = pytest.mark.slow


def _echo(rank, world_size, extra):
    import torch
    mesh = init_mesh(ParallelConfig(sp=-1))
    t = torch.tensor([float(rank)])
    torch.distributed.all_reduce(t)
    out = (rank, world_size, extra, mesh.rank, mesh.sp, float(t), os.environ.get("SKIPSYNC_X"))
    mesh.destroy()
    return out


def test_results_in_rank_order():
    res = run_dist(_echo, 3, "hi", env={"SKIPSYNC_X": "1"})
    assert res == [(r, 3, "hi", r, 3, 3.0, "1") for r in range(3)]


def _fail_on_rank1(rank, world_size):
    mesh = init_mesh(ParallelConfig(sp=world_size, timeout_s=30))
    if rank == 1:
        raise ValueError("boom on rank 1")
    import torch
    torch.distributed.all_reduce(torch.ones(1))  # rank 0 blocks here: its peer is gone
    return mesh.rank


def test_exception_propagates_with_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistError) as err:
        run_dist(_fail_on_rank1, 2, timeout=30)
    msg = str(err.value)
    assert "rank 1: ValueError: boom on rank 1" in msg
    assert "_fail_on_rank1" in msg  # the remote traceback
    assert time.monotonic() - t0 < 15  # did not wait for the collective timeout


def _hang_on_rank1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def test_timeout_kills_all_ranks():
    timeout = 2 if START_METHOD == "forkserver" else 20  # spawn re-imports torch in every rank
    t0 = time.monotonic()
    with pytest.raises(DistError, match=r"timed out .* ranks \[1\] of 2"):
        run_dist(_hang_on_rank1, 2, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 8
