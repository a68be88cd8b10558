"""The real Slurm paths on the one-node test cluster (launch/testing/slurm-cluster.sh up): the batch
script with 2 gloo ranks against one process, a Hydra Slurm sweep, a failing rank, scancel.

Every test is marked `slurm` and skipped when the cluster does not answer, so the quick and slow
tiers never need it. The cluster's node has 2 CPUs and, where mknod works, 2 fake GPUs (gres
entries on /dev/null-like devices): jobs ask for them as on a GPU cluster and run on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from runner.video import read_video
from tests.helpers import output_stem
from tests.slurm_util import (  # noqa: F401 - fixtures
    JOB_TIMEOUT_S, SMALL, _job_out, _videos, cluster, cluster_info,
)

pytestmark = pytest.mark.slurm

def test_sbatch_two_ranks_write_the_single_process_video(cluster, tmp_path):
    job = cluster.sbatch(tmp_path, *SMALL, "save_latent=true", "parallel.sp=2", f"output_dir={tmp_path / 'sb'}")
    # The reference runs while the job does (the job's ranks get their thread count from the launcher).
    one = subprocess.run([sys.executable, "-m", "runner.generate", *SMALL, "save_latent=true",
                          f"output_dir={tmp_path / 'one'}"], cwd=tmp_path, env=cluster.env, capture_output=True,
                         text=True, timeout=JOB_TIMEOUT_S)
    assert one.returncode == 0, one.stderr
    rec = cluster.wait(job)
    out = _job_out(tmp_path, job)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert "1 node(s) x 2 process(es)" in out, out
    stem, ref = output_stem(tmp_path / "sb"), output_stem(tmp_path / "one")
    assert os.path.basename(stem) == os.path.basename(ref)  # same prompt, seed and settings key
    assert torch.equal(torch.load(stem + ".latent.pt"), torch.load(ref + ".latent.pt"))  # fp32 CPU: exact
    assert np.array_equal(read_video(stem + ".mp4"), read_video(ref + ".mp4"))
    with open(stem + ".json", encoding="utf-8") as f:
        mesh = json.load(f)["parallel"]["mesh"]
    assert (mesh["world_size"], mesh["sp"], mesh["backend"]) == (2, 2, "gloo"), mesh


def _sweep(cluster, tmp_path, tasks: int) -> tuple[subprocess.CompletedProcess | None, str]:
    """A 2-point `-m hydra/launcher=slurm` sweep (seed=1,2), `tasks` ranks per point. Returns the
    launcher's result, or None with the reason when its jobs ended without a result and it would
    wait forever (submitit learns a failed job's state from sacct, which needs accounting)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e .[slurm]")
    name = f"skipsync-sweep-{os.getpid()}-{tasks}"
    gpus = str(tasks) if cluster.gpus >= tasks else "null"
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "runner.generate", "-m", "hydra/launcher=slurm",
           f"hydra.launcher.partition={cluster.partition}", f"hydra.launcher.name={name}",
           f"hydra.launcher.gpus_per_node={gpus}", f"hydra.launcher.tasks_per_node={tasks}",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep_dir}", *SMALL, f"parallel.sp={tasks}", f"output_dir={tmp_path / 'out'}",
           "seed=1,2"]
    with open(tmp_path / "launcher.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline, seen = time.monotonic() + 2 * JOB_TIMEOUT_S, False
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the sweep did not return in time"
                queued = cluster.queued("-n", name)
                # a fast job may come and go between two polls: its log tells it was there
                seen = seen or bool(queued) or any(sweep_dir.glob(".submitit/*_*/*_log.out"))
                results = list(sweep_dir.glob(".submitit/*/*_result.pkl")) if seen else []
                if seen and not queued and len(results) < 2:
                    time.sleep(2)  # a result written just before the job left the queue
                    if proc.poll() is None and len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) < 2:
                        logs = "".join(p.read_text(errors="replace") for p in sweep_dir.glob(".submitit/*/*.err"))
                        return None, f"the sweep's jobs ended without a result:\n{logs}"
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            cluster.run("scancel", "-n", name)
        log.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, log.read(), ""), ""


@pytest.mark.parametrize("tasks", [
    1,
    2,  # ranks from Slurm task variables (init_mesh passes them to init_process_group)
])
def test_hydra_slurm_sweep_runs_every_point_as_a_job(cluster, tmp_path, tasks):
    r, why = _sweep(cluster, tmp_path, tasks)
    assert r is not None, why
    assert r.returncode == 0, r.stdout
    videos = _videos(tmp_path / "out")
    assert [re.search(r"-s(\d+)-", v).group(1) for v in videos] == ["1", "2"], videos
    # one Slurm array task per point, each of whose `tasks` ranks logged its Slurm job environment
    logs = sorted((tmp_path / "sweep").glob(".submitit/*_*/*_log.out"))
    assert len(logs) == 2 * tasks, logs
    assert all("Starting with JobEnvironment" in p.read_text() for p in logs)


def test_a_failing_rank_fails_the_job_with_its_error_in_the_output(cluster, tmp_path):
    # Rank 0 loads the weights and finds no file; rank 1 is stopped by the failure propagation.
    job = cluster.sbatch(tmp_path, *SMALL, "model=demo", "model.weights=/nonexistent/w.safetensors",
                         "parallel.sp=2", f"output_dir={tmp_path / 'out'}")
    rec = cluster.wait(job)
    out = _job_out(tmp_path, job)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0"), out  # 2: bad input
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent/w.safetensors' does not exist" in errors[0], out
    assert _videos(tmp_path / "out") == []


def _job_processes(job: str) -> dict[int, list[str]]:
    """pid -> argv of every process that carries the job's id in its environment (the batch
    script, srun, the launcher, the ranks); slurmstepd itself does not."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"SLURM_JOB_ID={job}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found[int(pid)] = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:  # gone, or another user's
            continue
    return found


def test_scancel_ends_every_rank(cluster, tmp_path):
    job = cluster.sbatch(tmp_path, *[a for a in SMALL if a != "progress=false"], "sampler.num_steps=5000",
                         "progress=true", f"output_dir={tmp_path / 'out'}", "parallel.sp=2")
    out_file = tmp_path / f"skipsync-{job}.out"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (out_file.exists() and "sampling:" in out_file.read_text(errors="replace")):
        assert time.monotonic() < deadline and cluster.queued("-j", job), \
            out_file.read_text(errors="replace") if out_file.exists() else f"job {job} never started"
        time.sleep(0.3)
    procs = _job_processes(job)
    # the ranks are the launcher's python children: `python [-u] -m runner.generate ...`
    ranks = [pid for pid, argv in procs.items()
             if os.path.basename(argv[0]).startswith("python") and "runner.generate" in argv[1:4]]
    assert len(ranks) == 2, procs
    start = time.monotonic()
    assert cluster.run("scancel", job).returncode == 0
    # Below KillWait (10 s, when Slurm would SIGKILL): the ranks end on scancel's SIGTERM themselves.
    while _job_processes(job):
        assert time.monotonic() - start < 8, _job_processes(job)
        time.sleep(0.2)
    rec = cluster.wait(job, timeout=30)
    assert rec["JobState"] == "CANCELLED", rec
    out = out_file.read_text(errors="replace")
    assert "SIGTERM" in out, out  # the ranks said why they stopped
    assert _videos(tmp_path / "out") == [], "a cancelled run left a video"
