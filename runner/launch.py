"""torchrun, with the job's exit code being the failing rank's: `python -m runner.launch` / `skipsync-torchrun`.

    python -m runner.launch --standalone --nproc_per_node=2 -m runner.generate parallel.sp=2 prompt="..."

Takes torchrun's arguments unchanged and runs torch.distributed.run's launcher in this process. Two
differences from plain torchrun:

- When a rank fails, torchrun raises ChildFailedError, prints a multi-line summary with a traceback
  of the launcher itself, and exits 1 whatever the rank's code was. Here the job exits with the code
  of the rank that failed first (2 for bad input, 1 for a crash, 128+N for signal N), after one line
  saying which rank it was.
- Without OMP_NUM_THREADS in the environment, torchrun warns and gives every process 1 thread. Here
  each of the node's processes gets cores // processes threads (at least 1), said in one line.
- Stop signals (SIGINT, SIGTERM, SIGUSR1: Ctrl-C, scancel or preemption, Slurm's warning before the
  time limit) are forwarded to the ranks, and the launcher keeps waiting for them: they stop at an
  agreed step, write a checkpoint and exit 75 (130 for Ctrl-C), which becomes the job's exit code
  (runner/checkpoint.py). torchrun itself would leave SIGUSR1 to its default action (the launcher
  dies, the ranks run on in their own sessions) and raise on SIGTERM/SIGINT, exiting 128 + N.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

PROG = "skipsync-torchrun"


def available_cores() -> int:
    """The cores this process may use (taskset, Slurm cpusets), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_omp_threads(nproc: int, env=None) -> str | None:
    """Give each of `nproc` local processes an equal share of the cores unless OMP_NUM_THREADS is
    set; -> the line that says so, or None when nothing was set."""
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env or nproc <= 1:  # one process: torch's default (every core) is right
        return None
    cores = available_cores()
    n = max(1, cores // nproc)
    env["OMP_NUM_THREADS"] = str(n)  # torchrun passes it to every process and then does not warn
    return f"{PROG}: OMP_NUM_THREADS={n} per process ({cores} cores / {nproc} processes; set it to override)"


def first_failure(failures: dict) -> tuple[int, object]:
    """(global rank, ProcessFailure) of the failure that caused the others.

    torch's own choice (ChildFailedError.get_first_failure) is the earliest timestamp, but timestamps
    have a resolution of one second, so a rank that failed and its peers that stopped because of it
    usually tie. Among ties prefer a code of the rank's own (an exit code above 1, e.g. 2 for bad
    input, or a signal such as SIGKILL or SIGABRT) over exit code 1 (also the code of the runner's
    ranks that stop because another rank failed) over SIGTERM (the launcher stops the survivors with
    it); then the order torch recorded them in.
    """
    def kind(code: int) -> int:
        if code == 1:
            return 1
        return 2 if code == -signal.SIGTERM else 0

    return min(failures.items(), key=lambda kv: (kv[1].timestamp, kind(kv[1].exitcode)))


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# 75 only comes from a stop at a step checkpoint; 130 also from Ctrl-C without one (the ranks' own
# lines say which)
STOP_CODES = {75: "stopped at a step checkpoint", 130: "stopped on Ctrl-C"}


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (torchrun's workers are its direct children)."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def forward_stop_signals(agent_signals: str) -> str:
    """Install handlers that pass SIGINT, SIGTERM and SIGUSR1 on to this process's children (the
    ranks) and let torchrun's agent keep monitoring them; -> the signals left to the agent. Before
    any rank exists the launcher stops as torchrun would."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def forward(signum, frame):
        kids = children(os.getpid())
        if not kids:
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
        for pid in kids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for s in FORWARDED:
        signal.signal(s, forward)
    names = {s.name for s in FORWARDED}
    left = [n for n in (x.strip() for x in agent_signals.split(",")) if n and n not in names]
    return ",".join(left) or "SIGHUP"  # torch warns about an empty list


def exit_code(code: int) -> int:
    """The shell's convention: a process killed by signal N ends the job with 128 + N."""
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}"


class _DropFailureLog(logging.Filter):
    """torch's "failed (exitcode: ...) local_rank: ... of binary: ..." record: our line replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    note = set_omp_threads(torchrun.determine_local_world_size(args.nproc_per_node))
    if note:
        print(note, file=sys.stderr, flush=True)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureLog())
    if hasattr(args, "signals_to_handle"):  # the agent keeps the others (SIGHUP, SIGQUIT by default)
        args.signals_to_handle = forward_stop_signals(args.signals_to_handle)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = {exit_code(f.exitcode) for f in e.failures.values()}
        if len(codes) == 1 and next(iter(codes)) in STOP_CODES:  # every rank stopped the same way
            code = next(iter(codes))
            print(f"{PROG}: {len(e.failures)} rank{'s' if len(e.failures) > 1 else ''} {STOP_CODES[code]} "
                  f"(exit code {code}); run the same command again to resume", file=sys.stderr, flush=True)
            return code
        rank, f = first_failure(e.failures)
        others = len(e.failures) - 1
        more = (f"; {others} more rank{'s' if others > 1 else ''} failed or {'were' if others > 1 else 'was'} "
                "stopped on this node") if others else ""
        print(f"{PROG}: rank {rank} (local rank {f.local_rank}, pid {f.pid}) failed: {_describe(f.exitcode)}{more}",
              file=sys.stderr, flush=True)
        return exit_code(f.exitcode)
    except SignalException as e:  # this launcher was told to stop (Ctrl-C, scancel): its ranks are stopped
        print(f"{PROG}: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
