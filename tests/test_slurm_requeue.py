"""Jobs that survive Slurm's stops (launch/slurm.sbatch, runner/checkpoint.py) on the one-node test
cluster (launch/testing/slurm-cluster.sh up): a job warned with SIGUSR1 (what `--signal=B:USR1@T`
sends before the time limit) or requeued by `scontrol requeue` mid-run stops at a step checkpoint,
runs again and finishes with the uninterrupted run's final latent, bit for bit; a checkpoint left by
a 2-rank job is resumed by a 1-rank job.

Marked `slurm` and skipped without the cluster, like tests/test_slurm_cluster.py, whose fixtures
these tests use.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from runner.generate import generate
from tests.helpers import ROOT, make_cfg, output_stem
from tests.slurm_util import _job_out, _videos, cluster, cluster_info  # noqa: F401 - fixtures

pytestmark = pytest.mark.slurm

PROMPT = "prompt=a red circle moves left"
RUNS = {  # long enough that the stop lands mid-run; every_steps=5 overrides the script's 10
    "none": ("model=demo-random", "model.arch=STDiT3-tiny", "num_frames=4", "height=16", "width=16",
             "sampler.num_steps=200"),
    "adacache": ("model=demo", "sampler.num_steps=100", "cache=adacache"),
}
COMMON = ("device=cpu", "progress=false", "save_latent=true", "check_memory=false", PROMPT, "checkpoint.every_steps=5")
REQUEUED_TIMEOUT_S = 300  # a requeued job waits ~20 s (BeginTime) before it runs again


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """cache -> the final latent of one uninterrupted process."""
    out = {}
    for cache, run in RUNS.items():
        d = tmp_path_factory.mktemp(f"ref-{cache}")
        (rep,) = generate(make_cfg(*run, *COMMON, f"output_dir={d}"))
        out[cache] = torch.load(rep["output"][:-4] + ".latent.pt")
    return out


def _sbatch(cluster, out_dir, *overrides, gpus: int, options=()) -> str:
    """cluster.sbatch with extra sbatch options."""
    env = dict(cluster.env)
    if cluster.gpus >= gpus:
        opts = [f"--gpus-per-node={gpus}"]
    else:
        opts, env["GPUS_PER_NODE"] = ["--gpus-per-node=0"], str(gpus)
    r = subprocess.run(["sbatch", "--parsable", *opts, *options, f"--cpus-per-task={min(gpus, cluster.cpus)}",
                        f"--partition={cluster.partition}", "--time=10", f"--output={out_dir}/%x-%j.out",
                        "launch/slurm.sbatch", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    cluster.jobs.append(job)  # cancelled after the test
    return job


def _first_checkpoint(cluster, job, out_dir, timeout=120):
    deadline = time.monotonic() + timeout
    while not glob.glob(os.path.join(out_dir, "*.ckpt", "step-*")):
        assert time.monotonic() < deadline and cluster.queued("-j", job), f"job {job}: no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("cache, sp, how", [
    ("none", 1, "usr1"),
    ("adacache", 2, "usr1"),
    ("none", 2, "requeue"),
    ("adacache", 1, "requeue"),
])
def test_a_stopped_job_is_requeued_and_resumes_exactly(cluster, tmp_path, references, cache, sp, how):
    out = tmp_path / "out"
    job = cluster.sbatch(tmp_path, *RUNS[cache], *COMMON, f"parallel.sp={sp}", f"output_dir={out}", gpus=sp)
    _first_checkpoint(cluster, job, out)
    if how == "usr1":  # the time-limit warning: to the batch script, which stops the step and requeues
        r = cluster.run("scancel", "--signal=USR1", "--batch", job)
    else:  # Slurm requeues the job itself and stops it with SIGTERM
        r = cluster.run("scontrol", "requeue", job)
    assert r.returncode == 0, r.stderr
    rec = cluster.wait(job, timeout=REQUEUED_TIMEOUT_S)
    log = _job_out(tmp_path, job)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stopped = re.search(r"stopped: .*SIG(USR1|TERM) received; .*stopped after (\d+) of (\d+) steps", log)
    assert stopped and stopped.group(1) == ("USR1" if how == "usr1" else "TERM"), log
    step = stopped.group(2)
    assert f"resuming {os.path.basename(output_stem(out))} after {step} of" in log, log
    if how == "usr1":
        assert f"job {job} requeued, it resumes from its checkpoints" in log
    assert torch.equal(torch.load(output_stem(out) + ".latent.pt"), references[cache])
    assert not glob.glob(str(out / "*.ckpt"))


def test_a_checkpoint_of_a_2_rank_job_is_resumed_by_a_1_rank_job(cluster, tmp_path, references):
    out = tmp_path / "out"
    run = (*RUNS["adacache"], *COMMON, f"output_dir={out}")
    # --no-requeue: the script cannot requeue, says so, and the job ends with the checkpoint's code
    first = _sbatch(cluster, tmp_path, *run, "parallel.sp=2", gpus=2, options=["--no-requeue"])
    _first_checkpoint(cluster, first, out)
    assert cluster.run("scancel", "--signal=USR1", "--batch", first).returncode == 0
    rec = cluster.wait(first)
    log = _job_out(tmp_path, first)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "75:0"), log
    assert f"job {first} could not be requeued; submit the same command again to resume" in log
    (ckpt,) = glob.glob(str(out / "*.ckpt"))
    step_dir = max(os.listdir(ckpt))  # the stop's, beside the periodic one before it
    assert sorted(os.listdir(os.path.join(ckpt, step_dir))) == ["0-0.pt", "0-1.pt"] and not _videos(out)
    second = cluster.sbatch(tmp_path, *run, "parallel.sp=1", gpus=1)
    rec = cluster.wait(second)
    log = _job_out(tmp_path, second)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"after {int(step_dir[5:])} of 100 steps" in log, log
    assert torch.equal(torch.load(output_stem(out) + ".latent.pt"), references["adacache"])


def test_a_hydra_slurm_sweep_job_is_requeued_on_submitits_signal_and_resumes_exactly(cluster, tmp_path, references):
    """hydra-submitit-launcher: submitit's preemption signal (USR2, what it has Slurm send before the
    time limit) stops both ranks at a checkpoint; rank 0 requeues the job (runner/requeue.py), the
    requeued job resumes, and the sweep returns with the uninterrupted run's latent."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e .[slurm]")
    out, sweep_dir, name = tmp_path / "out", tmp_path / "sweep", f"skipsync-requeue-{os.getpid()}"
    gpus = "2" if cluster.gpus >= 2 else "null"
    cmd = [sys.executable, "-m", "runner.generate", "-m", "hydra/launcher=slurm",
           f"hydra.launcher.partition={cluster.partition}", f"hydra.launcher.name={name}",
           f"hydra.launcher.gpus_per_node={gpus}", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep_dir}",
           *RUNS["none"], *COMMON, "parallel.sp=2", f"output_dir={out}"]
    with open(tmp_path / "launcher.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (jobs := cluster.queued("-n", name)) or not glob.glob(str(out / "*.ckpt" / "step-*")):
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
            (job,) = jobs
            cluster.jobs.append(job)
            assert cluster.run("scancel", "--signal=USR2", job).returncode == 0
            proc.wait(timeout=REQUEUED_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        launcher = log.read()
    assert proc.returncode == 0, launcher
    logs = "".join(p.read_text(errors="replace") for p in sweep_dir.glob(".submitit/*/*_log.*"))
    assert re.search(r"stopped: .*stopped after (\d+) of 200 steps", logs), logs
    assert re.search(r"stopped: job \d+ requeued: it resumes from the checkpoint\n", logs), logs
    assert "resuming" in logs, logs
    with open(output_stem(out) + ".json", encoding="utf-8") as f:
        assert json.load(f)["checkpoint"]["resumed_from_step"] > 0
    assert torch.equal(torch.load(output_stem(out) + ".latent.pt"), references["none"])
