"""The opensora-v1.2 pipeline (T5, VAE latent, bf16-rounded conditioning size) on 2 gloo ranks
against one process: tiny checkpoints in the published layouts (the `weights_dir` fixture)."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dist_util import run_dist  # noqa: E402
from runner.generate import generate  # noqa: E402
from runner.video import read_video  # noqa: E402
from tests.helpers import make_cfg, output_stem  # noqa: E402

# 17 frames of 40x48 px -> latent 5 x 5 x 6: 3 patch rows (the last one half) over 2 ranks.
ARGS = ("model=opensora-v1.2", "num_frames=17", "height=40", "width=48", "sampler.num_steps=2",
        "progress=false", "prompt=a cat sitting on the mat", "save_latent=true", "device=cpu")


def _generate(rank, world, overrides):
    from runner.generate import generate as gen  # noqa: F811
    from tests.helpers import make_cfg as mk

    return [r["parallel"]["collectives_per_rank"][rank]["per_step"] for r in gen(mk(*overrides))]


@pytest.mark.slow
def test_opensora_pipeline_on_2_ranks_equals_one_process(weights_dir, tmp_path):
    common = (*ARGS, f"model.weights_dir={weights_dir}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores
    try:
        (ref,) = generate(make_cfg(*common, f"output_dir={tmp_path / 'one'}"))
    finally:
        torch.set_num_threads(threads)
    steps = run_dist(_generate, 2, (*common, f"output_dir={tmp_path / 'par'}", "parallel.sp=2"), timeout=90)
    lat, ref_lat = (torch.load(output_stem(tmp_path / d) + ".latent.pt") for d in ("par", "one"))
    assert lat.shape == ref_lat.shape == (1, 4, 5, 5, 6)
    assert (lat - ref_lat).abs().max().item() <= 1e-4 * ref_lat.abs().max().item()
    frames, ref_frames = (read_video(output_stem(tmp_path / d) + ".mp4").astype(int) for d in ("par", "one"))
    assert np.abs(frames - ref_frames).max() <= 1
    (per_step,) = steps[0]
    assert len(per_step) == 2 and all(set(ops) == {"all_to_all"} for ops in per_step.values())
