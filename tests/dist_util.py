"""Run a function on N local gloo ranks from a test: `run_dist(fn, world_size, *args)`.

Each rank is a fresh process with the torchrun variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so code under test calls `init_mesh` exactly as under torchrun. The
rendezvous store is hosted by the calling (pytest) process on a port the OS picks while binding,
as torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE), so parallel tests (pytest-xdist) cannot
race for a "free" port.

fn must be importable by name (a module-level function). Its return values come back in rank
order. If any rank raises, the others are killed and DistError carries the remote traceback(s);
past `timeout` seconds every rank is killed and DistError says which ranks had not finished.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch.distributed as dist
import torch.multiprocessing as mp

# forkserver: a clean server process (like spawn: no pytest threads or state are forked) that
# imports torch once, so each later rank starts in milliseconds instead of re-importing torch
# (several seconds per rank on the 2-core build machines). "spawn" works too, only slower.
START_METHOD = os.environ.get("SKIPSYNC_TEST_START_METHOD", "forkserver")


class DistError(AssertionError):
    """A rank failed, died or timed out; the message holds the remote traceback(s)."""


def _worker(fn, rank, world_size, port, result_path, env, args):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(1)  # N ranks share 2 cores
    try:
        out = ("ok", fn(rank, world_size, *args))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        out = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    try:
        payload = pickle.dumps(out)
    except Exception as e:  # an unpicklable return value is a test bug: say so
        payload = pickle.dumps(("error", f"return value of rank {rank} not picklable: {e}", ""))
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, result_path)  # atomic: the parent never reads half a file
    if out[0] == "ok" and dist.is_initialized():
        dist.destroy_process_group()
    # Skip interpreter teardown (gloo threads, atexit hooks): the result is already on disk.
    os._exit(0 if out[0] == "ok" else 1)


def _read(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None


def run_dist(fn, world_size: int, *args, timeout: float = 60, env: dict | None = None) -> list:
    """Run fn(rank, world_size, *args) on world_size gloo ranks; return the results in rank order.

    env: extra environment variables for the ranks. timeout counts from process start.
    Raises DistError on any failure or timeout.
    """
    __tracebackhide__ = True  # pytest: show the remote traceback, not this harness
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="run_dist_") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs = [ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                             args=(fn, r, world_size, store.port, paths[r], dict(env or {}), args))
                 for r in range(world_size)]
        try:
            for p in procs:
                p.start()
            return _collect(procs, paths, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
            del store


def _collect(procs, paths, timeout):
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        failures = _failures(procs, paths)
        if failures and failed_at is None:
            failed_at = time.monotonic()
        # After a first failure, give the other ranks a moment to report theirs (often the same
        # assertion), then stop waiting: they are probably blocked in a collective.
        if failures and (not alive or time.monotonic() - failed_at > 1.0):
            raise DistError(_format(failures, len(procs)))
        if not alive:
            return [_read(path)[1] for path in paths]
        now = time.monotonic()
        if now > deadline:
            pending = [r for r, p in enumerate(procs) if p.exitcode is None]
            raise DistError(f"timed out after {timeout:.0f} s; ranks {pending} of {len(procs)} "
                            "had not finished (a collective waiting for a rank that never joined?)")
        wait([p.sentinel for p in alive], timeout=min(0.2, deadline - now))


def _failures(procs, paths):
    out = []
    for r, (p, path) in enumerate(zip(procs, paths)):
        if p.exitcode is None:
            continue
        res = _read(path)
        if res is None:
            out.append((time.time(), r, f"died with exit code {p.exitcode} before reporting", ""))
        elif res[0] == "error":
            out.append((os.path.getmtime(path), r, res[1], res[2]))
    # Earliest report first: a peer's crash usually makes the others fail in their collectives.
    return [f[1:] for f in sorted(out)]


def _format(failures, world_size):
    parts = [f"{len(failures)} of {world_size} ranks failed (earliest first)"]
    for r, msg, tb in failures:
        parts.append(f"--- rank {r}: {msg}\n{tb}")
    return "\n".join(parts)
