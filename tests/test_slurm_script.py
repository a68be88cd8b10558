"""launch/slurm.sbatch and launch/torchrun.sh with srun, scontrol and torchrun replaced by recorders.

The fake srun emulates Slurm starting one task per node: it runs its command once per node with
SLURM_NODEID/SLURM_PROCID set; the fake torchrun writes its argv (one argument per line) and cwd.
"""

import contextlib
import os
import signal
import stat
import subprocess

import pytest

FAKE_SRUN = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$@" > "$REC/srun.argv"
args=("$@"); i=0
while [[ "${args[i]}" == -* ]]; do i=$((i + 1)); done  # options (all --opt=value)
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "${args[@]:i}"
done
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ "$1" == requeue ]]; then echo "$2" >> "$REC/requeue"; exit "${REQUEUE_CODE:-0}"; fi
[[ "$1 $2" == "show hostnames" ]] || exit 2
echo "$2 $3" > "$REC/scontrol.argv"
printf 'gpu-node-%s\n' 07 08 09
"""

FAKE_TORCHRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$REC/torchrun.${SLURM_NODEID:-local}.argv"
pwd > "$REC/torchrun.${SLURM_NODEID:-local}.cwd"
echo "$PYTHONPATH" > "$REC/torchrun.${SLURM_NODEID:-local}.pythonpath"
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return bin_dir, rec


def _env(bin_dir, rec, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("GPUS_PER_NODE", "RDZV_HOST", "RDZV_PORT",
                                                        "NPROC", "TORCHRUN", "SKIPSYNC_ROOT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", REC=str(rec), TORCHRUN=str(bin_dir / "torchrun"), **extra)
    return env


def _slurm_env(root, **extra):
    return {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_NNODES": "2",
            "SLURM_SUBMIT_DIR": root, **extra}


def _argv(rec, node):
    return (rec / f"torchrun.{node}.argv").read_text().splitlines()


OVERRIDES = ["parallel.sp=8", "parallel.dp=-1", "prompt=a red circle moves left"]
CHECKPOINTS = ["checkpoint.every_steps=10"]  # before the user's overrides, which win


def test_sbatch_starts_one_torchrun_per_node(fakes, repo_root):
    bin_dir, rec = fakes
    env = _env(bin_dir, rec, **_slurm_env(repo_root, SLURM_GPUS_ON_NODE="4"))
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/slurm.sbatch"), *OVERRIDES], cwd="/", env=env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    srun = (rec / "srun.argv").read_text().splitlines()
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    assert (rec / "scontrol.argv").read_text().split() == ["hostnames", "gpu-node-[07-09]"]
    for node in (0, 1):
        argv = _argv(rec, node)
        assert argv == ["--nnodes=2", "--nproc_per_node=4", f"--node_rank={node}",
                        "--rdzv_id=123456", "--rdzv_backend=c10d",
                        f"--rdzv_endpoint=gpu-node-07:{20000 + 123456 % 20000}",
                        "-m", "runner.generate", *CHECKPOINTS, *OVERRIDES]
        assert (rec / f"torchrun.{node}.cwd").read_text().strip() == repo_root
        assert (rec / f"torchrun.{node}.pythonpath").read_text().startswith(repo_root)
    assert not (rec / "torchrun.2.argv").exists()


def test_sbatch_env_overrides(fakes, repo_root):
    bin_dir, rec = fakes
    env = _env(bin_dir, rec, **_slurm_env(repo_root, SLURM_NNODES="3", SLURM_GPUS_ON_NODE="4"),
               GPUS_PER_NODE="2", RDZV_HOST="10.0.0.5", RDZV_PORT="29400")
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/slurm.sbatch")], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert not (rec / "scontrol.argv").exists()
    for node in (0, 1, 2):
        argv = _argv(rec, node)
        assert "--nnodes=3" in argv and "--nproc_per_node=2" in argv
        assert f"--node_rank={node}" in argv and "--rdzv_endpoint=10.0.0.5:29400" in argv
        assert argv[-3:] == ["-m", "runner.generate", *CHECKPOINTS]


def test_sbatch_defaults_to_8_gpus(fakes, repo_root):
    bin_dir, rec = fakes
    env = _env(bin_dir, rec, **_slurm_env(repo_root, SLURM_NNODES="1"))
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/slurm.sbatch")], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node=8" in _argv(rec, 0) and "--nnodes=1" in _argv(rec, 0)


def test_sbatch_outside_slurm_fails_clearly(fakes, repo_root):
    bin_dir, rec = fakes
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/slurm.sbatch")], cwd=repo_root, env=_env(bin_dir, rec),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode != 0 and "submit with sbatch" in r.stderr
    assert not (rec / "srun.argv").exists()


@pytest.mark.parametrize("args, nproc, rest", [
    (["4", "parallel.sp=4", "prompt=a b"], "4", ["parallel.sp=4", "prompt=a b"]),
    (["parallel.sp=1"], "1", ["parallel.sp=1"]),
])
def test_torchrun_wrapper(fakes, repo_root, args, nproc, rest):
    bin_dir, rec = fakes
    env = _env(bin_dir, rec)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"  # no nvidia-smi: one process
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/torchrun.sh"), *args], cwd="/",
                       env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert _argv(rec, "local") == ["--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
                                   "-m", "runner.generate", *rest]
    assert (rec / "torchrun.local.cwd").read_text().strip() == repo_root


# srun as Slurm runs one task: in the background, passing USR1 and TERM on to it.
FORWARDING_SRUN = r"""#!/usr/bin/env bash
args=("$@"); i=0
while [[ "${args[i]}" == -* ]]; do i=$((i + 1)); done
task=""; pending=""
# A signal that comes before the task has started is passed on as soon as it has (as Slurm does).
trap 'if [[ -n $task ]]; then kill -USR1 $task; else pending=USR1; fi' USR1
trap 'if [[ -n $task ]]; then kill -TERM $task; else pending=TERM; fi' TERM
SLURM_NODEID=0 "${args[@]:i}" &
task=$!
[[ -z $pending ]] || kill -$pending $task
while :; do wait $task && code=0 || code=$?; kill -0 $task 2>/dev/null || break; done
exit $code
"""

# The ranks as seen from the script: exit FAKE_EXIT at once, or (FAKE_EXIT=wait) stop at a
# checkpoint on USR1 or TERM like the runner does (exit 75), saying which signal came.
STOPPING_TORCHRUN = r"""#!/usr/bin/env bash
[[ "${FAKE_EXIT:-0}" == wait ]] || exit "${FAKE_EXIT:-0}"
trap 'echo USR1 > "$REC/got"; exit 75' USR1
trap 'echo TERM > "$REC/got"; exit 75' TERM
touch "$REC/ready"
while :; do sleep 0.05; done
"""


def _stop_fakes(fakes):
    bin_dir, rec = fakes
    for name, text in (("srun", FORWARDING_SRUN), ("torchrun", STOPPING_TORCHRUN)):
        (bin_dir / name).write_text(text)
    return bin_dir, rec


def _run_sbatch(fakes, repo_root, signum=None, **extra):
    bin_dir, rec = _stop_fakes(fakes)
    env = _env(bin_dir, rec, **_slurm_env(repo_root, SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2"), **extra)
    p = subprocess.Popen(["bash", os.path.join(repo_root, "launch/slurm.sbatch"), "prompt=x"], cwd="/", env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        return _finish_sbatch(p, rec, signum)
    finally:  # a failed test leaves no fake rank looping
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def _finish_sbatch(p, rec, signum):
    import time

    if signum is not None:
        deadline = time.monotonic() + 20
        while not (rec / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.02)
        p.send_signal(getattr(signal, signum))
    _, err = p.communicate(timeout=60)  # generous: a loaded CI machine
    got = (rec / "got").read_text().strip() if (rec / "got").exists() else None
    requeued = (rec / "requeue").read_text().split() if (rec / "requeue").exists() else []
    return p.returncode, err, got, requeued


@pytest.mark.parametrize("exit_code, requeued", [("75", ["123456"]), ("0", []), ("2", []), ("138", [])])
def test_sbatch_requeues_the_job_when_the_ranks_stop_at_a_checkpoint(fakes, repo_root, exit_code, requeued):
    code, err, _, calls = _run_sbatch(fakes, repo_root, FAKE_EXIT=exit_code)
    assert code == int(exit_code) and calls == requeued, err
    if requeued:
        assert "job 123456 requeued, it resumes from its checkpoints" in err


def test_sbatch_passes_the_time_limit_warning_on_and_requeues(fakes, repo_root):
    code, err, got, calls = _run_sbatch(fakes, repo_root, signum="SIGUSR1", FAKE_EXIT="wait")
    assert (code, got, calls) == (75, "USR1", ["123456"]), err
    assert "SIGUSR1 received, passed on to the job step" in err


def test_sbatch_passes_sigterm_on_and_does_not_requeue_a_cancelled_job(fakes, repo_root):
    code, err, got, calls = _run_sbatch(fakes, repo_root, signum="SIGTERM", FAKE_EXIT="wait")
    assert (code, got, calls) == (75, "TERM", []), err


def test_sbatch_says_when_the_job_cannot_be_requeued(fakes, repo_root):
    code, err, _, calls = _run_sbatch(fakes, repo_root, FAKE_EXIT="75", REQUEUE_CODE="1")
    assert code == 75 and calls == ["123456"], err
    assert "could not be requeued; submit the same command again to resume" in err
