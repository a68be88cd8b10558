"""The scaling sweep's Slurm launcher on the one-node test cluster (launch/testing/slurm-cluster.sh
up): one real Slurm job per point through submitit, 1 and 2 ranks, and the table from them."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slurm

STATE = os.environ.get("SKIPSYNC_SLURM_DIR", "/tmp/skipsync-slurm")  # as in launch/testing/slurm-cluster.sh


@pytest.fixture
def slurm_env():
    env = subprocess_env()
    env.setdefault("SLURM_CONF", os.path.join(STATE, "slurm.conf"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no Slurm here ({e}); bash launch/testing/slurm-cluster.sh up")
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip(f"the test cluster does not answer (sinfo: {r.stderr.strip()}); bash launch/testing/slurm-cluster.sh up")
    return env, r.stdout.split()[0].rstrip("*")


def test_sweep_runs_every_point_as_a_slurm_job(tmp_path, slurm_env):
    env, partition = slurm_env
    study = str(tmp_path / "study")
    r = subprocess.run(
        [sys.executable, "-m", "runner.scaling", f"dir={study}", "model=demo-random", "steps=2", "repeats=1",
         "warmup=0", "num_frames=4", "height=32", "width=32", "gpus=[1,2]", "layouts=[dsp]", "caches=[none]",
         "launcher=slurm", f"slurm.partition={partition}", "slurm.gpus_per_node=2", "slurm.cpus_per_task=2",
         "slurm.mem_gb=2", "slurm.timeout_min=5", "slurm.request_gpus=false", "timeout_s=120"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    for pid in ("n1-sp1-none", "n2-dsp-none"):
        with open(os.path.join(study, "points", pid, "point.json")) as f:
            assert json.load(f)["status"] == "ok", pid
    reps = [f for f in os.listdir(os.path.join(study, "points", "n2-dsp-none", "out")) if f.endswith(".json")]
    with open(os.path.join(study, "points", "n2-dsp-none", "out", reps[0])) as f:
        rep = json.load(f)
    assert rep["parallel"]["mesh"]["world_size"] == 2 and rep["host"]["backend"] == "gloo"
    r = subprocess.run([sys.executable, "-m", "runner.scaling", "report", study, "--no-plots"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "| 2 | dsp |" in r.stdout, r.stderr[-2000:]
