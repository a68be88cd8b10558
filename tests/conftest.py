import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
