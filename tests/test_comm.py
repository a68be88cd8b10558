"""Counted collectives: results against slices of the full tensor, and the exact log, on 2-4 ranks."""

import json

import pytest
import torch

from dist_util import run_dist
from parallel.comm import Comm, CommLog, split_range, split_sizes
from parallel.mesh import Mesh, ParallelConfig, init_mesh

# ----------------------------------------------------------------------------- pure logic


@pytest.mark.parametrize("n, p", [(0, 3), (5, 1), (7, 3), (8, 4), (2, 4), (100, 7)])
def test_split_sizes_and_ranges(n, p):
    sizes = split_sizes(n, p)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first n % p ranks get one more
    stop = 0
    for r in range(p):
        start, end = split_range(n, p, r)
        assert start == stop and end - start == sizes[r]
        stop = end
    assert stop == n


def test_split_errors():
    with pytest.raises(ValueError):
        split_sizes(4, 0)
    with pytest.raises(ValueError):
        split_range(4, 2, 2)


def test_world_size_1_is_identity_and_records_nothing():
    comm = Comm(Mesh.layout(0, 1, 1, 1, 1))
    x = torch.randn(2, 5, 3)
    assert comm.all_to_all(x, "sp", 1, 2) is x
    assert comm.all_to_all(x, "sp", 1, 2, scatter_sizes=[5], gather_sizes=[3]) is x
    assert comm.all_gather(x, "sp", 1) is x
    assert comm.all_reduce(x, "agree") is x
    assert comm.broadcast(x, "cfg") is x
    assert comm.all_gather_object({"a": 1}, "world") == [{"a": 1}]
    comm.barrier()
    assert comm.log.events == []


def test_size1_group_in_larger_world_records_nothing():
    # world 2 = cfg 2 x sp 1: the sp group has one rank, no process group needed for it
    comm = Comm(Mesh.layout(1, 2, 1, 2, 1))
    x = torch.randn(3, 4)
    assert comm.all_to_all(x, "sp", 0, 1) is x and comm.all_gather(x, "dp", 0) is x
    assert comm.log.events == []
    with pytest.raises(RuntimeError, match="init_mesh"):  # a real group but no process group
        comm.all_reduce(x, "cfg")


def test_log_steps_phases_summary():
    log = CommLog()
    log.record("all_reduce", "agree", 2, 8, 8, 8)  # before the loop: step None
    log.set_step(0)
    log.record("all_to_all", "sp", 2, 100, 50, 60)
    log.record("all_to_all", "sp", 2, 100, 50, 60)
    log.set_step(1)  # a cached step: nothing recorded
    log.set_step(2)
    with log.in_phase("decode"):
        log.record("all_gather", "sp", 2, 10, 10, 12, tag="latent")
    assert log.phase == "main"
    log.set_step(None)
    log.record("barrier", "world", 2, 0, 0, 0)
    assert log.per_step() == {
        0: {"all_to_all": {"count": 2, "bytes": 200, "bytes_remote": 100, "bytes_in": 120}},
        1: {},
        2: {"all_gather": {"count": 1, "bytes": 10, "bytes_remote": 10, "bytes_in": 12}},
    }
    s = log.summary()
    assert (s["count"], s["bytes"], s["bytes_remote"], s["bytes_in"]) == (5, 218, 118, 140)
    assert s["steps_without_collectives"] == [1]
    assert s["by_group"]["sp"]["count"] == 3 and s["by_phase"]["decode"]["bytes"] == 10
    assert s["outside_steps"]["count"] == 2
    assert log.events[3].tag == "latent"
    log.reset()
    assert log.events == [] and log.per_step() == {} and log.step is None


# ----------------------------------------------------------------------------- multi-process

F32 = 4


def _full(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _shard(x, dim, p, r, sizes=None):
    start, stop = split_range(x.shape[dim], p, r) if sizes is None else (
        sum(sizes[:r]), sum(sizes[:r + 1]))
    return x.narrow(dim, start, stop - start)


def _battery(rank, world_size, cfg):
    """Collectives on the sp group (and cfg/agree/world), each checked against the full tensor,
    then the exact log. Different sp groups get different data, so mixing would show."""
    mesh = init_mesh(ParallelConfig(cfg=cfg, sp=-1, timeout_s=30))
    p, r = mesh.sp, mesh.sp_rank
    seed = 100 * (mesh.dp_rank * mesh.cfg + mesh.cfg_rank)
    comm = Comm(mesh)
    log = comm.log
    expect = []  # (op, group, bytes_out, bytes_remote, bytes_in, step)

    def a2a_case(step, B, T, S, C, dtype=torch.float32, **kw):
        # S-sharded -> T-sharded (scatter T, gather S) and back, like a DSP layout switch.
        log.set_step(step)
        full = _full(seed + step, B, T, S, C, dtype=dtype)
        ts, ss = split_sizes(T, p), split_sizes(S, p)
        x = _shard(full, 2, p, r)
        y = comm.all_to_all(x, "sp", scatter_dim=1, gather_dim=2, gather_sizes=ss, **kw)
        assert torch.equal(y, _shard(full, 1, p, r)), (step, y.shape)
        z = comm.all_to_all(y, "sp", scatter_dim=-2, gather_dim=-3, scatter_sizes=ss,
                            gather_sizes=ts)
        assert torch.equal(z, x)
        e = full.element_size()
        kept = ts[r] * ss[r] * B * C * e
        expect.append(("all_to_all", "sp", x.numel() * e, x.numel() * e - kept,
                       y.numel() * e - kept, step))
        expect.append(("all_to_all", "sp", y.numel() * e, y.numel() * e - kept,
                       z.numel() * e - kept, step))

    a2a_case(0, 2, 3 * p, 2 * p, 5)  # equal splits
    a2a_case(1, 1, 5, 7, 3)  # uneven for p = 2, 3, 4
    a2a_case(2, 2, p - 1, 2 * p + 1, 2)  # fewer T than ranks: the last rank gets none
    a2a_case(3, 1, 6, 5, 8, dtype=torch.bfloat16)

    log.set_step(4)  # a step with no collectives (a cached step)
    log.set_step(5)
    # all_gather, uneven along dim 1, even along dim 0
    full = _full(seed + 5, 3, 7, 2)
    g = comm.all_gather(_shard(full, 1, p, r), "sp", dim=1, sizes=split_sizes(7, p))
    assert torch.equal(g, full)
    n = _shard(full, 1, p, r).numel() * F32
    expect.append(("all_gather", "sp", n, n * (p - 1), full.numel() * F32 - n, 5))
    full = _full(seed + 6, 2 * p, 3)
    g = comm.all_gather(_shard(full, 0, p, r), "sp", dim=0)
    assert torch.equal(g, full)
    expect.append(("all_gather", "sp", 6 * F32, 6 * F32 * (p - 1), 6 * F32 * (p - 1), 5))

    log.set_step(None)
    with log.in_phase("agree"):
        x = torch.tensor([float(r), 1.0])
        assert comm.all_reduce(x, "sp") is x  # in place
        assert x.tolist() == [p * (p - 1) / 2, float(p)]
        expect.append(("all_reduce", "sp", 8, 8 * (p - 1), 8 * (p - 1), None))
        m = comm.all_reduce(torch.tensor([float(r)]), "sp", op="max")
        assert m.item() == p - 1
        expect.append(("all_reduce", "sp", 4, 4 * (p - 1), 4 * (p - 1), None))
    b = torch.full((3,), float(r))
    comm.broadcast(b, "sp", src=p - 1)  # src is the index inside the group
    assert b.tolist() == [p - 1.0] * 3
    expect.append(("broadcast", "sp", 12 if r == p - 1 else 0,
                   12 * (p - 1) if r == p - 1 else 0, 0 if r == p - 1 else 12, None))
    objs = comm.all_gather_object({"rank": mesh.rank}, "world")
    assert objs == [{"rank": q} for q in range(world_size)]
    comm.barrier()

    if mesh.cfg > 1:  # the CFG pair and the agree group
        v = torch.tensor([float(mesh.cfg_rank + 1)])
        assert comm.all_reduce(v, "cfg").item() == 3.0
        expect.append(("all_reduce", "cfg", 4, 4, 4, None))
        a = comm.all_gather(torch.tensor([float(mesh.rank)]), "agree", dim=0)
        assert a.tolist() == [float(q) for q in mesh.agree_ranks]
        expect.append(("all_gather", "agree", 4, 4 * 3, 12, None))

    ev = [e for e in log.events if e.op not in ("all_gather_object", "barrier")]
    got = [(e.op, e.group, e.bytes_out, e.bytes_remote, e.bytes_in, e.step) for e in ev]
    assert got == expect
    rest = [(e.op, e.group) for e in log.events if e.op in ("all_gather_object", "barrier")]
    assert rest == [("all_gather_object", "world"), ("barrier", "world")]
    assert all(e.phase == "agree" for e in log.events if e.op == "all_reduce" and e.group == "sp")
    per_step = log.per_step()
    assert per_step[4] == {} and per_step[1]["all_to_all"]["count"] == 2
    mesh.destroy()
    return json.loads(json.dumps({"summary": log.summary(), "per_step": log.per_step()}))


@pytest.mark.slow
@pytest.mark.parametrize("world_size, cfg", [(2, 1), (3, 1), (4, 1), (4, 2)])
def test_collectives_match_full_tensor_and_log(world_size, cfg):
    logs = run_dist(_battery, world_size, cfg, timeout=60)
    p = world_size // cfg
    for rank, d in enumerate(logs):
        assert d["summary"]["steps_without_collectives"] == [4]
        # step 1 (T=5, S=7, B=1, C=3): every rank sends its whole shard except what it keeps
        a2a = d["per_step"]["1"]["all_to_all"]
        s, t = split_sizes(7, p)[rank % p], split_sizes(5, p)[rank % p]
        assert a2a["count"] == 2 and a2a["bytes"] == (5 * s + t * 7) * 3 * F32
