"""launch/torchrun.sh and launch/slurm.sbatch start skipsync's launcher (python -m runner.launch) unless
TORCHRUN names another; a fake python3 records what it is given."""

import os
import stat
import subprocess

FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$REC/python.${SLURM_NODEID:-local}.argv"
"""


def _fakes(tmp_path):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    p = bin_dir / "python3"
    p.write_text(FAKE_PYTHON)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    srun = bin_dir / "srun"  # one task per node, as Slurm does
    srun.write_text('#!/usr/bin/env bash\nargs=("$@"); i=0\nwhile [[ "${args[i]}" == -* ]]; do i=$((i + 1)); done\n'
                    'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "${args[@]:i}"; done\n')
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TORCHRUN", "PYTHON", "NPROC", "GPUS_PER_NODE", "RDZV_HOST")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", REC=str(rec))
    return env, rec


def test_torchrun_sh_uses_runner_launch(tmp_path, repo_root):
    env, rec = _fakes(tmp_path)
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/torchrun.sh"), "2", "parallel.sp=2"], cwd="/",
                       env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert (rec / "python.local.argv").read_text().splitlines() == [
        "-m", "runner.launch", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "runner.generate",
        "parallel.sp=2"]


def test_sbatch_uses_runner_launch_on_every_node(tmp_path, repo_root):
    env, rec = _fakes(tmp_path)
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="2", SLURM_SUBMIT_DIR=repo_root,
               RDZV_HOST="n1", GPUS_PER_NODE="4")
    r = subprocess.run(["bash", os.path.join(repo_root, "launch/slurm.sbatch"), "parallel.sp=8"], cwd="/",
                       env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    for node in (0, 1):
        argv = (rec / f"python.{node}.argv").read_text().splitlines()
        assert argv[:2] == ["-m", "runner.launch"] and f"--node_rank={node}" in argv, argv
        # the script's checkpoint default comes before the user's overrides, which win
        assert argv[-4:] == ["-m", "runner.generate", "checkpoint.every_steps=10", "parallel.sp=8"], argv
