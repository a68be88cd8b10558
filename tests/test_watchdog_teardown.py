"""Issue 13: the end of a successful distributed run must not abort ("terminate called without an
active exception", SIGABRT) because the watchdog thread is inside a store call at teardown.

A daemon thread that returns from a C++ store call (GIL released) after the interpreter has begun
finalizing is ended by pthread_exit inside pybind11's gil_scoped_release destructor; the forced
unwind through that noexcept destructor calls std::terminate. Here the thread is made to be inside a
real 0.5 s TCPStore call when the rank closes, which aborted every time before the fix.
"""

import subprocess
import textwrap
import threading
import time

import pytest

from parallel.watchdog import Watchdog
from torchrun_util import ROOT, env, standalone


class SlowStore:
    """A store whose first `add` from the watchdog thread takes `delay` seconds."""

    def __init__(self, delay: float):
        self.delay, self.data, self.log = delay, {}, []
        self.inside, self.slow_done = threading.Event(), threading.Event()

    def add(self, key, n):
        if threading.current_thread().name == "skipsync-watchdog" and not self.inside.is_set():
            self.inside.set()
            time.sleep(self.delay)
            self.slow_done.set()
        self.log.append(("add", key))
        self.data[key] = int(self.data.get(key, 0)) + n
        return self.data[key]

    def set(self, key, value):
        self.log.append(("set", key))
        self.data[key] = value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]

    def compare_set(self, key, expected, desired):
        if self.data.get(key, "") == expected:
            self.data[key] = desired
        return self.data[key]


def test_finish_waits_for_the_thread_to_leave_its_store_call():
    store = SlowStore(delay=0.3)
    wd = Watchdog(store, rank=0, world_size=2, timeout_s=30, interval_s=0.01).start()
    assert store.inside.wait(5)
    wd.finish()
    assert store.slow_done.is_set()  # finish returned only after the store call did
    assert not wd._thread.is_alive()
    assert store.log[-1] == ("set", "done/0")  # announced after the thread stopped beating
    assert wd.store is None  # its client closed
    assert wd.claim_failure() == 0  # harmless after finish
    wd.finish()  # twice is fine


SCRIPT = textwrap.dedent("""
    import os, sys, threading
    from datetime import timedelta
    from parallel.comm import Comm
    from parallel.mesh import ParallelConfig, init_mesh
    from parallel.watchdog import Watchdog
    from runner.distributed import Parallel

    mesh = init_mesh(ParallelConfig(sp=2, backend="gloo", timeout_s=30))
    wd = Watchdog.connect(mesh.rank, mesh.world_size, 30, interval_s=0.05)
    inside = threading.Event()
    beat = wd._beat

    def slow_beat():
        if threading.current_thread() is wd._thread and not inside.is_set():
            inside.set()
            try:  # a real store call that is still running (GIL released, in C++) when the rank closes
                wd.store.wait(["never-set"], timedelta(seconds=0.5))
            except Exception:
                pass
        beat()

    wd._beat = slow_beat
    wd.start()
    assert inside.wait(10)
    Parallel(mesh, Comm(mesh), watchdog=wd).close()
    print(f"rank {mesh.rank} closed", flush=True)
""")


@pytest.mark.slow
def test_close_while_the_watchdog_is_inside_a_store_call_exits_cleanly(tmp_path):
    script = tmp_path / "close_job.py"
    script.write_text(SCRIPT)
    r = subprocess.run(standalone(2, [str(script)]), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    out = r.stdout + r.stderr
    assert "terminate called" not in out, out
    assert r.returncode == 0, out
    assert "rank 0 closed" in out and "rank 1 closed" in out, out
