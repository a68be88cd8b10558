"""Any rank failing ends every rank: a failure flag and heartbeats in the rendezvous store.

Collectives alone do not stop ranks that are not waiting on the failed one (another dp group on
another node keeps generating), and a rank that is still computing only notices a dead peer at its
next collective. So every rank of a distributed run keeps a `Watchdog`: a daemon thread with its
own client of the rendezvous TCPStore (MASTER_ADDR:MASTER_PORT, as torchrun and init_mesh use) that

- beats: increments `beat/<rank>` every `interval_s` (and reads the others' every timeout_s / 10);
- stops this rank (exit 1) as soon as another rank has claimed `failed`;
- stops this rank when another rank's heartbeat has not moved for `timeout_s` (a killed process or
  a lost node), claiming `failed` itself so the others stop too;
- ignores ranks that finished normally (`done/<rank>`).

`claim_failure()` lets the rank that fails first say so atomically (compare-and-set): the runner
prints the full error only on that rank, so it appears once. If the store becomes unreachable the
watchdog stops watching (it never ends a healthy run on its own trouble); the collective timeout
still bounds every wait.

`finish()` joins the thread before it returns, and `Parallel.close` calls it before destroying the
process group. A daemon thread still inside a store call when the interpreter finalizes is killed
by pthread_exit as it re-takes the GIL in pybind11's `gil_scoped_release` destructor; that forced
unwind through a noexcept destructor is std::terminate: "terminate called without an active
exception", SIGABRT, after a successful run (issue 13).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist


def _exit(code: int) -> None:
    """Leave now: no interpreter teardown, which could block on a process group with dead peers."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(code)


def _store_timeout_s(store, default: float) -> float:
    try:
        return store.timeout.total_seconds()
    except Exception:  # noqa: BLE001 - a store without one (a test's fake)
        return default


def connect_store(prefix: str, timeout_s: float, env=None):
    """A client of the rendezvous TCPStore named by MASTER_ADDR/MASTER_PORT (as torchrun and init_mesh
    use), its keys under `prefix`; None without one or when it cannot be reached. Each caller gets
    its own connection: the watchdog's thread and the main thread never share a client."""
    env = os.environ if env is None else env
    host, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=min(float(timeout_s), 60.0)))
    except Exception:  # noqa: BLE001 - no store rather than no run
        return None
    return dist.PrefixStore(prefix, store)


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, timeout_s: float, interval_s: float = 1.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s, self.interval_s = float(timeout_s), float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Every store call of the thread ends within the client's timeout (set by connect), so a
        # join this long always sees the thread leave.
        self.join_timeout_s = self.interval_s + _store_timeout_s(store, self.timeout_s) + 1.0

    @classmethod
    def connect(cls, rank: int, world_size: int, timeout_s: float, env=None, interval_s: float = 1.0) -> "Watchdog | None":
        """A watchdog on the rendezvous store named by MASTER_ADDR/MASTER_PORT, or None without one."""
        store = connect_store("skipsync/watchdog/", timeout_s, env)
        return None if store is None else cls(store, rank, world_size, timeout_s, interval_s)

    # ---- the rank's own side
    def start(self) -> "Watchdog":
        self._beat()
        self._thread = threading.Thread(target=self._run, name="skipsync-watchdog", daemon=True)
        self._thread.start()
        # A process that ends without finish() (not the runner's way) must not finalize around the
        # thread either; atexit runs before the interpreter starts finalizing.
        atexit.register(self._halt)
        return self

    def claim_failure(self) -> int:
        """Record this rank as the failed one unless another rank did first; the first one's rank."""
        if self.store is None:  # finished: nothing to tell
            return self.rank
        try:
            return int(self.store.compare_set("failed", "", str(self.rank)))
        except Exception:  # noqa: BLE001 - store gone: report as if first
            return self.rank

    def finish(self) -> None:
        """This rank ended normally: stop the thread and wait for it to leave any store call, tell
        the others not to wait for its beats, and close this client of the store. Call it before
        destroying the process group (see the module's docstring for why the join matters)."""
        self._halt()
        atexit.unregister(self._halt)
        if self.store is None:  # finished already
            return
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            pass
        self.store = None  # the last reference: the C++ client closes its socket now, not at exit

    def _halt(self) -> None:
        """Stop the thread and join it (it ends at its next check of the event, or when its current
        store call returns)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(self.join_timeout_s)
            if t.is_alive():  # its store call outlived the client's timeout: should not happen
                print(f"[rank {self.rank}] warning: the watchdog thread did not stop within "
                      f"{self.join_timeout_s:g} s", file=sys.stderr)

    # ---- the thread
    def _beat(self) -> None:
        self.store.add(f"beat/{self.rank}", 1)

    def _stop_rank(self, reason: str) -> None:
        first = self.claim_failure()
        if first == self.rank:
            print(f"error: [rank {self.rank}] {reason}; stopping every rank", file=sys.stderr)
        else:
            print(f"[rank {self.rank}] stopping: rank {first} failed", file=sys.stderr)
        _exit(1)

    def _run(self) -> None:
        start = time.monotonic()
        seen = {r: (-1, start) for r in range(self.world_size) if r != self.rank}  # rank -> (beats, when seen)
        finished: set[int] = set()
        scan_every, last_scan = max(self.interval_s, self.timeout_s / 10), start  # peers' beats: fewer store calls
        try:
            while not self._stop.wait(self.interval_s):
                self._beat()
                if self.store.check(["failed"]):
                    first = int(self.store.get("failed"))
                    if first != self.rank and not self._stop.is_set():
                        print(f"[rank {self.rank}] stopping: rank {first} failed", file=sys.stderr)
                        _exit(1)
                now = time.monotonic()
                if now - last_scan < scan_every:
                    continue
                last_scan = now
                for r, (beats, when) in seen.items():
                    if r in finished:
                        continue
                    if self.store.check([f"done/{r}"]):
                        finished.add(r)
                        continue
                    n = self.store.add(f"beat/{r}", 0)
                    if n != beats:
                        seen[r] = (n, now)
                    elif now - when > self.timeout_s and not self._stop.is_set():
                        self._stop_rank(f"rank {r} stopped responding (no heartbeat for {self.timeout_s:g} s: killed or lost?)")
        except Exception:  # noqa: BLE001 - the store went away (e.g. the job is ending): stop watching
            return
