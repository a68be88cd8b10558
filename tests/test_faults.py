"""Faults under real torchrun (2 ranks, sp=2): a rank that raises, is killed, hangs, or sees bad
input ends the whole job non-zero within the collective timeout; the error is printed once; no rank
survives. tests/fault_job.py injects the fault into `python -m runner.generate`."""

import os

import pytest

from torchrun_util import run_all, standalone, survivors

TIMEOUT_S = 6  # parallel.timeout_s of the jobs
ARGS = ["model=demo-random", "model.arch=STDiT3-tiny", "num_frames=5", "height=9", "width=10", "sampler.num_steps=2",
        "progress=false", "device=cpu", "prompt=a red circle moves left", f"parallel.timeout_s={TIMEOUT_S}"]


def _job(tmp_path, piddir, mode, *extra, nproc=2):
    target = ["tests/fault_job.py", str(piddir), mode, "1", *ARGS, f"output_dir={tmp_path / 'out'}", *extra]
    codes, out, seconds = run_all([standalone(nproc, target)], timeout=90)
    return codes[0], out, seconds


@pytest.mark.slow
def test_rank_raising_mid_run_ends_the_job(tmp_path, piddir):
    code, out, seconds = _job(tmp_path, piddir, "raise", "parallel.sp=2")
    assert code not in (0, None), out
    assert out.count("RuntimeError: injected fault on rank 1") == 1, out
    assert out.count("error: [rank 1]") == 1 and "error: [rank 0]" not in out, out
    assert survivors(piddir) == []
    assert not os.path.exists(tmp_path / "out") or not [f for f in os.listdir(tmp_path / "out") if f.endswith(".mp4")]


@pytest.mark.slow
def test_killed_rank_ends_the_job(tmp_path, piddir):
    code, out, seconds = _job(tmp_path, piddir, "kill", "parallel.sp=2")
    assert code not in (0, None), out
    assert "Signal 9 (SIGKILL) received by PID" in out, out  # the launcher saw rank 1 killed in the loop
    assert survivors(piddir) == []


@pytest.mark.slow
def test_bad_input_on_one_rank_ends_the_job_before_any_collective(tmp_path, piddir):
    code, out, seconds = _job(tmp_path, piddir, "bad_input", "parallel.sp=2")
    assert code not in (0, None), out
    assert out.count("simulated on rank 1") == 1, out
    assert "Traceback" not in out.split("torch/distributed/elastic")[0], out  # before the launcher's own report
    assert survivors(piddir) == []


@pytest.mark.slow
def test_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path, piddir):
    code, out, seconds = _job(tmp_path, piddir, "hang", "parallel.sp=2")
    assert code not in (0, None), out
    assert out.count("error: [rank 0] a collective failed") == 1, out
    assert f"parallel.timeout_s={TIMEOUT_S}" in out
    assert TIMEOUT_S <= seconds, seconds
    assert survivors(piddir) == []
