"""Requeueing a Hydra Slurm sweep's job (hydra-submitit-launcher) that stopped at a step checkpoint.

submitit runs a sweep point's ranks as the tasks of one Slurm job and has Slurm send its preemption
signal (SUBMITIT_PREEMPT_SIGNAL, USR2 unless set) `signal_delay_s` before the time limit. Its own
handler would requeue at once, without a checkpoint, and ignores SIGTERM. Under submitit the runner
takes both as stop signals instead (`stop_signals`): the ranks stop at an agreed computed step and
write the checkpoint, each says so in the rendezvous store, and the job's rank 0 waits for all of
them (`after_stop`) and requeues the job. The requeued job runs the same point again (the launcher
pickled its overrides) and resumes from the checkpoint. As with launch/slurm.sbatch, SIGTERM
(scancel, `scontrol requeue`) checkpoints but does not requeue by itself: a cancelled job stays
cancelled, and Slurm requeues a requeued one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from parallel.watchdog import connect_store

WAIT_S = 60.0  # how long rank 0 waits for the other ranks' checkpoints before requeueing anyway


def under_submitit(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in env


def preempt_signal(env=None) -> int:
    """submitit's preemption signal (its SUBMITIT_PREEMPT_SIGNAL convention: a name without SIG)."""
    env = os.environ if env is None else env
    name = env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name")
    return int(sig)


def stop_signals(env=None) -> tuple[int, ...]:
    """The stop signals beyond SIGINT/SIGTERM/SIGUSR1 for this process: submitit's, under submitit."""
    return (preempt_signal(env),) if under_submitit(env) else ()


def _key(env) -> str:
    # unique per run of the job: a requeued job starts a new store, but say which run anyway
    return f"{env['SLURM_JOB_ID']}/{env.get('SLURM_RESTART_COUNT', '0')}"


def after_stop(signum: int, rank: int, world_size: int, timeout_s: float = WAIT_S, env=None, run=subprocess.run,
               store=None) -> str | None:
    """After this rank's checkpoint of a stop on `signum`: under submitit, count it in the store; on
    rank 0, for the preemption signal, wait for every rank's count (at most `timeout_s`: a data-
    parallel group that had finished its prompts never stops) and requeue the job. -> a line for
    the log, or None where nothing was done."""
    env = os.environ if env is None else env
    if not under_submitit(env):
        return None
    store = store if store is not None else connect_store("skipsync/requeue/", timeout_s, env)
    key = _key(env)
    if store is not None:
        store.add(key, 1)
    if rank != 0 or signum != preempt_signal(env):
        return None
    seen, deadline = world_size, time.monotonic() + timeout_s
    if store is not None:
        while (seen := store.add(key, 0)) < world_size and time.monotonic() < deadline:
            time.sleep(0.1)
    job = env["SLURM_JOB_ID"]
    res = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if res.returncode:
        return (f"job {job} could not be requeued ({(res.stderr or res.stdout).strip()}); run the sweep point "
                "again to resume")
    missing = "" if seen >= world_size else f" ({world_size - seen} of {world_size} ranks had not checkpointed)"
    return f"job {job} requeued: it resumes from the checkpoint{missing}"
