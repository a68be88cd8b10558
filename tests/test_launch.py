"""runner.launch (skipsync-torchrun): torchrun whose exit code is the failing rank's, with one line
instead of ChildFailedError's summary, and OMP_NUM_THREADS set per core share without torchrun's warning."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from runner.launch import exit_code, first_failure, set_omp_threads
from torchrun_util import ROOT, env

TORCHRUN_OMP_WARNING = "Setting OMP_NUM_THREADS environment variable"
SMALL = ["model=demo-random", "model.arch=STDiT3-tiny", "num_frames=5", "height=9", "width=10", "sampler.num_steps=2",
         "progress=false", "device=cpu", "prompt=a red circle moves left", "parallel.sp=2", "parallel.timeout_s=20"]


def _failure(timestamp, exitcode, local_rank=0):
    return SimpleNamespace(timestamp=timestamp, exitcode=exitcode, local_rank=local_rank, pid=100 + local_rank)


def test_first_failure_is_the_earliest():
    rank, f = first_failure({0: _failure(11, 1), 1: _failure(10, 2), 2: _failure(10, -15)})
    assert (rank, f.exitcode) == (1, 2)


def test_first_failure_breaks_one_second_ties_by_cause():
    # The rank with bad input exits 2; its peer stops with 1 in the same second; the launcher's SIGTERM last.
    assert first_failure({0: _failure(10, 1), 1: _failure(10, 2)})[0] == 1
    assert first_failure({0: _failure(10, -15), 1: _failure(10, 1)})[0] == 1
    # A rank killed by SIGKILL (OOM killer, kill -9) caused the peer's collective failure (exit 1).
    assert first_failure({0: _failure(10, 1), 1: _failure(10, -9)})[0] == 1
    assert first_failure({0: _failure(10, 1), 1: _failure(10, 1)})[0] == 0  # same kind: torch's order


def test_exit_code_of_a_signal_is_128_plus_it():
    assert (exit_code(2), exit_code(1), exit_code(-9), exit_code(-6)) == (2, 1, 137, 134)


def test_omp_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr("runner.launch.available_cores", lambda: 16)
    e = {}
    assert "OMP_NUM_THREADS=4" in set_omp_threads(4, e) and e["OMP_NUM_THREADS"] == "4"
    e = {}
    set_omp_threads(3, e)
    assert e["OMP_NUM_THREADS"] == "5"
    e = {}
    set_omp_threads(32, e)
    assert e["OMP_NUM_THREADS"] == "1"  # never 0
    e = {"OMP_NUM_THREADS": "7"}
    assert set_omp_threads(4, e) is None and e["OMP_NUM_THREADS"] == "7"  # the user's choice stays
    e = {}
    assert set_omp_threads(1, e) is None and e == {}  # one process: torch's default, every core


def _launch(args, omp=None, timeout=180):
    e = env()
    del e["OMP_NUM_THREADS"]  # runner.launch must choose it, without torchrun's warning
    if omp is not None:
        e["OMP_NUM_THREADS"] = omp
    r = subprocess.run([sys.executable, "-m", "runner.launch", "--standalone", "--nproc_per_node=2", *args],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _error_lines(out):
    return [line for line in out.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_bad_input_exits_2_with_one_error_line(tmp_path):
    code, out = _launch(["-m", "runner.generate", *SMALL, "sampler.num_steps=0", f"output_dir={tmp_path}"])
    assert code == 2, out
    assert len(_error_lines(out)) == 1 and "sampler.num_steps" in _error_lines(out)[0], out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    assert "skipsync-torchrun: rank " in out and "exit code 2" in out, out
    assert TORCHRUN_OMP_WARNING not in out, out
    assert out.count("skipsync-torchrun: OMP_NUM_THREADS=") == 1, out


@pytest.mark.slow
def test_bad_input_on_one_rank_exits_2(tmp_path, piddir):
    # Only rank 1 sees bad input; rank 0 is stopped (exit 1 or the launcher's SIGTERM).
    code, out = _launch(["tests/fault_job.py", str(piddir), "bad_input", "1", *SMALL, f"output_dir={tmp_path}"])
    assert code == 2, out
    assert len(_error_lines(out)) == 1 and "simulated on rank 1" in out, out
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_killed_rank_exits_137(tmp_path, piddir):
    code, out = _launch(["tests/fault_job.py", str(piddir), "kill", "1", *SMALL, f"output_dir={tmp_path}"])
    assert code == 128 + 9, out
    assert "rank 1 (local rank 1" in out and "killed by SIGKILL" in out, out
    assert "ChildFailedError" not in out, out


@pytest.mark.slow
def test_good_run_exits_0_without_the_omp_warning(tmp_path):
    code, out = _launch(["-m", "runner.generate", *SMALL, f"output_dir={tmp_path}"])
    assert code == 0, out
    assert [n for n in os.listdir(tmp_path) if n.endswith(".mp4")], out
    assert TORCHRUN_OMP_WARNING not in out and "skipsync-torchrun: OMP_NUM_THREADS=" in out, out
    assert "terminate called" not in out, out


@pytest.mark.slow
def test_users_omp_num_threads_is_kept(tmp_path):
    code, out = _launch(["-m", "runner.generate", *SMALL, f"output_dir={tmp_path}"], omp="1")
    assert code == 0, out
    assert "OMP_NUM_THREADS" not in out, out  # neither torchrun's warning nor our note
