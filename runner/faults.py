"""How a job ends when something goes wrong: one message, the right exit code, every rank stopped.

The CLI (runner/generate.py) hands every exception out of a job to `exit_on_error(e, par)`, with
the job's `runner.distributed.Parallel` once it exists:

- bad input (`UserError`, `CheckpointError`): one `error: ...` paragraph, exit code 2;
- a stop signal (`runner.cli.Interrupted`): one `stopped: ...` line, exit code 128 + the signal;
- a stop at a step checkpoint (`runner.checkpoint.Stopped`): one `stopped: ...` line from the group
  leader saying where the checkpoint is and how to resume, exit code 75 (EX_TEMPFAIL: rerun to
  resume; Slurm requeues) or 130 for Ctrl-C; the other ranks of the group are not told to stop
  (they stop at the same step by agreement and may still be writing their shards); in a Hydra
  Slurm sweep's job, rank 0 then requeues the job on submitit's preemption signal (runner/requeue.py);
- a failed collective (`parallel.comm.CollectiveError`: a peer crashed, was killed or stalled):
  one line naming it;
- anything else: the traceback.

Inputs are validated on every rank before the first collective. Distributed, a rank that fails
claims the failure in the rendezvous store (the watchdog's), so only the first failing rank prints
the error, and leaves at once with os._exit; the others stop within the collective timeout (a
collective with a dead peer fails at once or times out) or when their watchdog sees the claim.
"""

from __future__ import annotations

import sys
import traceback

from models.loading import CheckpointError
from parallel.comm import CollectiveError
from parallel.mesh import launch_env
from parallel.watchdog import _exit
from runner import requeue
from runner.checkpoint import Stopped
from runner.cli import Interrupted
from runner.config import UserError

EXPECTED = (UserError, CheckpointError)  # bad input: one paragraph, exit code 2, no traceback


def exit_on_error(e: BaseException, par=None, expected: tuple = EXPECTED) -> None:
    """End the process for exception e; `par` is the job's Parallel (None before it exists).

    Single process: bad input exits 2, a signal 128 + N, anything else is re-raised (a normal
    traceback). Before the mesh exists the error is the same on every rank (it depends only on the
    command line and world size): rank 0 prints it, all exit 2.
    """
    is_expected = isinstance(e, expected)
    distributed = par is not None and par.mesh.is_distributed
    if isinstance(e, Stopped):
        if not distributed or par.is_writer:
            where = f"[rank {par.mesh.rank}] " if distributed else ""
            print(f"stopped: {where}{e.message(distributed)}", file=sys.stderr)
        if distributed and par.watchdog is not None:
            par.watchdog.finish()  # a clean end: the peers must not take its silence for a failure
        rank, world = (par.mesh.rank, par.mesh.world_size) if par is not None else (0, 1)
        note = requeue.after_stop(e.signum, rank, world)  # a Hydra Slurm sweep's job: requeue it
        if note:
            print(f"stopped: {note}", file=sys.stderr)
        _exit(e.exit_code)
    if isinstance(e, Interrupted):
        where = f"[rank {par.mesh.rank}] " if distributed else ""
        print(f"stopped: {where}{e.name} received; no partial file is left, finished videos are kept "
              "(run the same command again to resume)", file=sys.stderr)
        if distributed and par.watchdog is not None:
            par.watchdog.claim_failure()
        rank, world = (par.mesh.rank, par.mesh.world_size) if par is not None else (0, 1)
        note = requeue.after_stop(e.signum, rank, world)  # no checkpoint yet: the rerun starts over
        if note:
            print(f"stopped: {note}", file=sys.stderr)
        _exit(e.exit_code)
    if not distributed:
        if not is_expected:
            raise e
        rank, world, _ = launch_env()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if world > 1:
            _exit(2)
        sys.exit(2)
    rank = par.mesh.rank
    first = par.watchdog.claim_failure() if par.watchdog is not None else rank
    if first != rank:
        print(f"[rank {rank}] stopping: rank {first} failed ({type(e).__name__} here)", file=sys.stderr)
    elif is_expected:
        print(f"error: [rank {rank}] {e}", file=sys.stderr)
    elif isinstance(e, CollectiveError):
        print(f"error: [rank {rank}] a collective failed: {e} (another rank crashed, was killed, "
              f"or stalled longer than parallel.timeout_s={par.timeout_s:g} s)", file=sys.stderr)
    else:
        print(f"error: [rank {rank}] " + "".join(traceback.format_exception(e)), file=sys.stderr, end="")
    _exit(2 if is_expected else 1)
