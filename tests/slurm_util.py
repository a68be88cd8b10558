"""The one-node Slurm test cluster as the `slurm` tests see it (launch/testing/slurm-cluster.sh up):
the `cluster` fixture (skipped with the reason when the cluster does not answer), job submission
and waiting, the jobs' outputs. Test modules import the fixtures from here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from tests.helpers import ROOT, subprocess_env

SMALL = ["model=demo-random", "num_frames=4", "height=32", "width=32", "sampler.num_steps=3", "progress=false",
         "device=cpu", "prompt=a red circle moves left"]
JOB_TIMEOUT_S = 120  # 2-rank jobs take the node's 2 CPUs, so concurrent tests queue behind each other
# Variables of an enclosing launch that would make the job's ranks or launcher wrong.
LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
         "RDZV_HOST", "RDZV_PORT", "TORCHRUN", "SKIPSYNC_ROOT", "SKIPSYNC_RANKS_FROM_SLURM")
STATE = os.environ.get("SKIPSYNC_SLURM_DIR", "/tmp/skipsync-slurm")  # as in launch/testing/slurm-cluster.sh


def _slurm_conf() -> str:
    return os.environ.get("SLURM_CONF") or os.path.join(STATE, "slurm.conf")


@dataclass
class Cluster:
    partition: str
    cpus: int
    gpus: int
    env: dict
    jobs: list = field(default_factory=list)  # ids submitted by the current test, cancelled after it

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30, **kw)

    def sbatch(self, out_dir, *overrides, gpus: int = 2) -> str:
        """Submit launch/slurm.sbatch from the repository root (it finds the code through the submit
        directory) with `gpus` processes; the job's output goes to out_dir/skipsync-<id>.out."""
        env = dict(self.env)
        if self.gpus >= gpus:
            opts = [f"--gpus-per-node={gpus}"]  # the script reads SLURM_GPUS_ON_NODE, as on a GPU cluster
        else:
            opts, env["GPUS_PER_NODE"] = ["--gpus-per-node=0"], str(gpus)
        r = subprocess.run(["sbatch", "--parsable", *opts, f"--cpus-per-task={min(gpus, self.cpus)}",
                            f"--partition={self.partition}", "--time=10", f"--output={out_dir}/%x-%j.out",
                            "launch/slurm.sbatch", *overrides],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def queued(self, *args) -> list[str]:
        r = self.run("squeue", "-h", "-o", "%i", *args)
        return r.stdout.split() if r.returncode == 0 else []

    def wait(self, job: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        """Poll until the job leaves the queue; its record (kept MinJobAge = 300 s after it ends;
        there is no accounting for sacct) as a dict."""
        deadline = time.monotonic() + timeout
        while self.queued("-j", job):
            assert time.monotonic() < deadline, f"job {job} still queued after {timeout} s"
            time.sleep(0.2)
        r = self.run("scontrol", "show", "job", job)
        assert r.returncode == 0, r.stderr
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


@pytest.fixture(scope="module")
def cluster_info():
    if shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed: bash launch/testing/slurm-cluster.sh up")
    # Quick answers first: sinfo looks for a missing config, or a stopped controller, for seconds.
    if not os.path.exists(_slurm_conf()) or ("SLURM_CONF" not in os.environ
                                             and not os.path.exists(os.path.join(STATE, "daemons.pid"))):
        pytest.skip(f"the Slurm test cluster is not up (no {_slurm_conf()} or no daemons recorded beside it): "
                    "bash launch/testing/slurm-cluster.sh up")
    env = {k: v for k, v in subprocess_env().items() if k not in LEAKY and not k.startswith("SLURM_")}
    # sbatch exports this environment to the job: its interpreter runs the launcher and the ranks.
    env.update(SLURM_CONF=_slurm_conf(), PYTHON=sys.executable)
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %T %c %G"], env=env, capture_output=True, text=True,
                           timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip("the Slurm test cluster does not answer: bash launch/testing/slurm-cluster.sh up")
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    usable = [row for row in rows if row[1].rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
    if r.returncode != 0 or not usable:
        why = (r.stderr.strip() or r.stdout.strip() or "no node").splitlines()[-1]
        pytest.skip(f"the Slurm test cluster is not up ({why}): bash launch/testing/slurm-cluster.sh up")
    partition, _, cpus, gres = usable[0]
    gpus = re.search(r"gpu:(\d+)", gres)
    return partition.rstrip("*"), int(cpus), int(gpus.group(1)) if gpus else 0, env


@pytest.fixture
def cluster(cluster_info):
    c = Cluster(*cluster_info)
    yield c
    if c.jobs:  # a failed test leaves nothing running
        c.run("scancel", *c.jobs)


def _videos(out_dir) -> list[str]:
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".mp4")) if os.path.isdir(out_dir) else []


def _job_out(out_dir, job) -> str:
    with open(os.path.join(out_dir, f"skipsync-{job}.out"), encoding="utf-8", errors="replace") as f:
        return f.read()
