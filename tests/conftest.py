import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Under pytest-xdist every worker would start one intra-op thread per core: `-n 2` on 2 cores runs
# 4 threads that spin-wait on each other (a 3-step demo generation took 9.6 s of CPU with 2 threads,
# 0.4 s with 1, on the shared build machine). One per worker, inherited by the processes tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 (submitit's) as the test process started with them.
_STOPS = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}


@pytest.fixture(autouse=True)
def _stop_signal_dispositions():
    """Every test starts and ends with the process's original handling of the stop signals. The
    runner ignores later stop signals after the first (runner.cli.ignore_stops); a test, or a module
    fixture, that stops it in-process would otherwise leave SIG_IGN in its xdist worker, every
    process started later inherits it, and a shell cannot trap a signal ignored on entry (the sbatch
    signal tests hung)."""
    def restore():
        for s, handler in _STOPS.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)

    restore()
    yield
    restore()


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture
def piddir(tmp_path):
    """Where torchrun fault jobs write their pids; any survivor is killed afterwards."""
    from torchrun_util import survivors

    d = tmp_path / "pids"
    d.mkdir()
    yield d
    for pid in survivors(d, wait_s=0):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (the build machines' 2 cores are shared; more threads only
    spin). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A tiny random Open-Sora 1.2 `model.weights_dir` (stdit3/, vae/, t5/ in the published layouts),
    built once per module. Needs diffusers and transformers: modules that use it skip without them."""
    from tests.opensora_util import write_weights_dir

    return write_weights_dir(tmp_path_factory.mktemp("opensora"))
