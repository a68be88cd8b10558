"""The scaling sweep runner (runner/scaling/sweep.py): its points, a tiny real sweep with its table
and plots, resume, failed / timed-out / refused points, and the Slurm launcher through submitit."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from runner.config import UserError
from runner.scaling import sweep as sw
from runner.scaling import table
from tests.helpers import ROOT, subprocess_env

TINY = ["model=demo-random", "steps=2", "repeats=1", "warmup=1", "num_frames=4", "height=32", "width=32",
        "layouts=[dsp]"]


def run_sweep(study, *overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "runner.scaling", f"dir={study}", *TINY, *overrides],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=timeout)


def point(study, pid):
    with open(os.path.join(study, "points", pid, "point.json")) as f:
        return json.load(f)


def test_points_leave_out_what_cannot_run():
    cfg = sw.ScalingConfig(gpus=[1, 2, 3, 4], layouts=["dsp", "ulysses"], caches=["none", "adacache"],
                           cfg_parallel=[False, True], model="demo-random")
    points, skipped = sw.points(cfg)
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    # the demo architecture has 4 heads: Ulysses at sp=3 cannot split them; CFG-parallel needs an even count
    assert "n3-ulysses-none" not in ids and "n3-dsp-none" in ids and "n4-ulysses-adacache" in ids
    assert any("ulysses" in s and "sp=3" in s for s in skipped)
    assert "n2-sp1-none-cfg2" in ids and not any(i.startswith("n3-") and i.endswith("cfg2") for i in ids)
    assert [p.sp for p in points if p.id == "n4-dsp-none-cfg2"] == [2]
    assert ids.count("n1-sp1-none") == 1  # one sequence-parallel rank: one point, not one per layout


def test_bad_sweep_settings_are_refused():
    with pytest.raises(UserError, match="launcher='x'"):
        sw.Sweep(sw.ScalingConfig(launcher="x", model="demo-random"))
    with pytest.raises(UserError, match="caches"):
        sw.Sweep(sw.ScalingConfig(caches=["nope"], model="demo-random"))
    with pytest.raises(UserError, match="not in conf/model"):
        sw.Sweep(sw.ScalingConfig(model="nope"))


def test_points_larger_than_the_machine_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sw.Sweep, "machine_gpus", lambda self: 1)
    cfg = sw.ScalingConfig(dir=str(tmp_path / "s"), gpus=[2], layouts=["dsp"], caches=["none"], model="demo-random",
                           measure_comm=False)
    recs = sw.Sweep(cfg).run()
    assert [r["status"] for r in recs] == ["refused"]
    assert "needs 2 GPUs; this machine has 1" in recs[0]["error"]
    assert not os.path.exists(tmp_path / "s" / "points" / "n2-dsp-none" / "log.txt")  # nothing was started


@pytest.mark.slow
def test_tiny_sweep_fills_the_table_and_draws_the_plots(tmp_path):
    study = str(tmp_path / "study")
    t0 = time.perf_counter()
    r = run_sweep(study, "gpus=[1,2]", "caches=[none,adacache]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[4/4]" in r.stderr and "collectives at 2 processes: measured" in r.stderr
    first = time.perf_counter() - t0
    with open(os.path.join(study, "points", "n2-dsp-none", "command.txt")) as f:
        assert "--nproc_per_node=2" in f.read()

    rep = json.load(open(sorted(glob.glob(os.path.join(study, "points", "n2-dsp-adacache", "out", "*.json")))[-1]))
    assert rep["index"] == 1  # the warm-up video is index 0
    ranks = rep["parallel"]["collectives_per_rank"]
    assert len(ranks) == 2 and all(x["memory"]["phases"]["sampling"]["cpu_s"] > 0 for x in ranks)
    assert rep["host"]["threads_per_rank"] == 1 and rep["host"]["backend"] == "gloo" and rep["host"]["world_size"] == 2
    assert rep["steps"]["computed"]["count"] + rep["steps"]["reused"]["count"] == 2 and rep["timings"]["writing_s"] > 0

    r = subprocess.run([sys.executable, "-m", "runner.scaling", "report", study], capture_output=True, text=True,
                       env=subprocess_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.load(open(os.path.join(study, "scaling.json")))
    rows = data["rows"]
    assert len(rows) == 4 and all(x["status"] == "ok" for x in rows)
    for row in rows:
        # every column has a value; reused_step_s only where a step was reused, error only on failures
        empty = [c for c in table.COLUMNS if row[c] in (None, "") and c not in ("error", "reused_step_s")]
        assert not empty, (row["point"], empty)
        assert row["psnr_db"] == "inf"  # the 2-process video equals the 1-process one
        assert row["reused_step_collectives"] == 0
    assert data["environment"]["cpu_cores"] >= 1
    for name in ("latency", "efficiency", "cache_speedup", "phases", "bytes"):
        for ext in ("png", "svg"):
            assert os.path.getsize(os.path.join(study, "plots", f"{name}.{ext}")) > 1000
    assert "| gpus |" in open(os.path.join(study, "scaling.md")).read()

    # a rerun skips the complete points and starts nothing
    t0 = time.perf_counter()
    r = run_sweep(study, "gpus=[1,2]", "caches=[none,adacache]")
    assert r.returncode == 0 and r.stderr.count("complete") == 4, r.stderr[-2000:]
    assert time.perf_counter() - t0 < first / 2


@pytest.mark.slow
def test_failed_and_timed_out_points_are_recorded_and_the_sweep_goes_on(tmp_path):
    study = str(tmp_path / "bad")
    r = run_sweep(study, "gpus=[1]", "caches=[none,adacache]", "measure_comm=false",
                  f'overrides=["model.weights={tmp_path}/missing"]')
    assert r.returncode == 0, r.stderr[-2000:]
    for pid in ("n1-sp1-none", "n1-sp1-adacache"):  # the first failure did not stop the sweep
        rec = point(study, pid)
        assert rec["status"] == "failed" and rec["returncode"] == 2 and "missing" in rec["error"], rec
    md = subprocess.run([sys.executable, "-m", "runner.scaling", "report", study, "--no-plots"], capture_output=True,
                        text=True, env=subprocess_env(), cwd=ROOT, timeout=300).stdout
    assert "n1-sp1-none: **failed**" in md

    slow = str(tmp_path / "slow")
    r = run_sweep(slow, "gpus=[1]", "caches=[none]", "measure_comm=false", "steps=500", "timeout_s=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert point(slow, "n1-sp1-none")["status"] == "timeout"
    assert "timeout" in r.stderr


@pytest.mark.slow
def test_slurm_launcher_through_submitit(tmp_path):
    # submitit's local executor runs the same job function as on a cluster, in a subprocess
    study = str(tmp_path / "slurm")
    r = run_sweep(study, "gpus=[1]", "caches=[none]", "launcher=slurm", "slurm.executor=local",
                  "slurm.gpus_per_node=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "submitted n1-sp1-none" in r.stderr
    assert point(study, "n1-sp1-none")["status"] == "ok"
    assert len(glob.glob(os.path.join(study, "points", "n1-sp1-none", "out", "*.mp4"))) == 2
    assert "--nproc_per_node=1" in open(os.path.join(study, "points", "n1-sp1-none", "command.txt")).read()
