"""Two "nodes" on this machine: two torchrun launchers (--nnodes 2 --nproc_per_node 1) meeting at a
c10d rendezvous on 127.0.0.1, as launch/slurm.sbatch starts them on a cluster."""

import re

import pytest
import torch

from runner.generate import generate
from tests.helpers import make_cfg, output_stem
from torchrun_util import free_port, node, run_all, survivors

ARGS = ["model=demo-random", "model.arch=STDiT3-tiny", "num_frames=5", "height=9", "width=10", "sampler.num_steps=2",
        "progress=false", "device=cpu", "save_latent=true", "prompt=a red circle moves left"]


@pytest.mark.slow
def test_two_nodes_produce_the_single_process_latent(tmp_path):
    port = free_port()
    target = ["-m", "runner.generate", *ARGS, "parallel.sp=2", "parallel.timeout_s=60", f"output_dir={tmp_path / 'mn'}"]
    codes, out, _ = run_all([node(2, port, target), node(2, port, target)], timeout=120)
    assert codes == [0, 0], out
    (ref,) = generate(make_cfg(*ARGS, f"output_dir={tmp_path / 'one'}"))
    latent = torch.load(output_stem(tmp_path / "mn") + ".latent.pt")
    ref_latent = torch.load(output_stem(tmp_path / "one") + ".latent.pt")
    assert (latent - ref_latent).abs().max().item() <= 1e-4 * ref_latent.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failure_on_one_node_stops_the_other_dp_group(tmp_path, piddir, fault):
    # dp=2: the two ranks share no collective in the loop. The rank of the second launcher fails at
    # its first step while the other hangs in its own; only the watchdog (failure flag /
    # heartbeats) can end it. The first launcher hosts the rendezvous store, as the first node of
    # a Slurm job does: were the failing launcher the host, its exit would take the store along
    # and the surviving launcher would stop its worker itself, before the watchdog speaks.
    timeout_s = 6
    port = free_port()
    common = [*ARGS, "parallel.dp=2", f"parallel.timeout_s={timeout_s}", "prompt=null",
              f"prompts_file={_prompts(tmp_path)}", f"output_dir={tmp_path / 'out'}"]
    host = node(2, port, ["tests/fault_job.py", str(piddir), f"{fault}+hang", "none", *common], is_host=True)
    other = node(2, port, ["tests/fault_job.py", str(piddir), f"{fault}+hang", "here", *common], is_host=False)
    codes, out, seconds = run_all([host, other], timeout=90)
    assert None not in codes and codes != [0, 0], out
    assert survivors(piddir) == []
    if fault == "raise":
        failed = re.findall(r"RuntimeError: injected fault on rank (\d)", out)
        assert len(failed) == 1, out
        survivor = 1 - int(failed[0])
        assert f"[rank {survivor}] stopping: rank {failed[0]} failed" in out, out


def _prompts(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle moves left\na blue square moves up\n")
    return pf
