"""Reference-frame conditioning end to end (issue 17): the sampler's per-step frame handling against
a hand-worked expectation, conditioned runs of the CLI (given frames kept, loops, bad references),
and sharded conditioned runs against one process (slow tier).

The tiny setting of tests/test_parallel_generate.py: STDiT3-tiny with random weights in fp32, a
5-frame 9x10 video (5 latent frames, 5 patch rows, divisible by none of p = 2, 3).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dist_util import run_dist
from runner.conditioning import FrameStep, edit_schedule, load_reference
from runner.generate import generate
from runner.sampler import GivenFrames, SamplerSettings, sample
from runner.video import read_video
from tests.helpers import ROOT, make_cfg, output_stem, subprocess_env

BASE = ("model=demo-random", "model.arch=STDiT3-tiny", "num_frames=5", "height=9", "width=10", "sampler.num_steps=4",
        "progress=false", "save_latent=true", "device=cpu")
# Reference 0's first frame at target frame 0 (kept) and at target frame 2 with edit ratio 0.5 (kept
# until t <= 500, then re-noised and regenerated).
STRATEGY = "mask_strategy='0,0,0,0,1,0;0,0,0,2,1,0.5'"


# ---- the sampler, by hand ------------------------------------------------------------------------


def test_given_frames_by_hand():
    """Three frames with edit ratios 0, 0.5, 1; a model whose velocity is 1 everywhere (cfg_scale 1:
    the guided velocity is the conditional one), timesteps 1000, 750, 500, 250, and step i's noise
    10 + i. Frame 0 stays the reference r0; frame 1 is given until t = 500, where it is re-noised to
    0.5 r1 + 0.5 * 12 and then moves by 0.25 twice; frame 2 moves by 1 from its noise n2."""
    r0, r1, n2 = 3.0, -2.0, 0.5  # exact in float32
    z = torch.tensor([r0, r1, n2]).view(1, 1, 3, 1, 1)
    ratios = torch.tensor([0.0, 0.5, 1.0])
    timesteps = [1000.0, 750.0, 500.0, 250.0]
    seen = []

    def model_fn(z_in, t_in, info, x_mask=None):
        seen.append((z_in[0, 0, :, 0, 0].tolist(), x_mask[0].tolist()))
        return torch.ones_like(z_in)

    steps = edit_schedule(ratios, timesteps)
    given = GivenFrames(steps, lambda i: torch.full((1, 1, 3, 1, 1), 10.0 + i))
    out = sample(model_fn, z, SamplerSettings(cfg_scale=1.0), timesteps, 1, given=given)
    assert out[0, 0, :, 0, 0].tolist() == [r0, 0.5 * r1 + 0.5 * 12 + 0.5, n2 + 1.0]
    assert [m for _, m in seen] == [[False, False, True]] * 2 + [[False, True, True]] * 2
    # the model sees frame 1 re-noised at step 2, and the given frame 0 unchanged at every step
    assert seen[2][0][1] == 0.5 * r1 + 0.5 * 12 and all(v[0] == r0 for v, _ in seen)
    assert [s.renoise.tolist() for s in steps] == [[False] * 3] * 2 + [[False, True, False], [False] * 3]


def test_no_given_frames_is_the_old_sampler():
    z = torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    fn = lambda z_in, t_in, info: torch.tanh(z_in) * t_in[:, None, None, None, None] / 1000  # noqa: E731
    a = sample(fn, z, SamplerSettings(cfg_scale=3.0), [1000.0, 600.0, 200.0], 3)
    steps = [FrameStep(torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))] * 3
    b = sample(lambda z_in, t_in, info, x_mask=None: fn(z_in, t_in, info), z, SamplerSettings(cfg_scale=3.0),
               [1000.0, 600.0, 200.0], 3, given=GivenFrames(steps, lambda i: torch.zeros_like(z)))
    assert torch.equal(a, b)  # all frames generated, nothing re-noised: the same arithmetic


def test_moreg_counts_pairs_of_generated_frames_only():
    from runner.cache.metric import motion_sums

    r = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    frames = torch.tensor([False, True, True, True])  # frame 0 given
    per = r.abs().sum(dim=(0, 2, 3), dtype=torch.float64)
    d = [(r[:, t + 1] - r[:, t]).abs().sum(dtype=torch.float64) for t in (1, 2)]
    got = motion_sums(r, [1], frames)
    assert torch.allclose(got, torch.stack([d[0] + d[1], per[2] + per[3] + per[1] + per[2]]), rtol=1e-12)
    # all generated: the released sums, bit for bit
    assert torch.equal(motion_sums(r, [1, 2], torch.ones(4, dtype=torch.bool)), motion_sums(r, [1, 2]))


# ---- the entry point -----------------------------------------------------------------------------


def _image(path, seed=0, size=(12, 14)):
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(*size, 3) * 255).astype("uint8")).save(path)
    return str(path)


def _latent(out, index=0):
    return torch.load(output_stem(out, index) + ".latent.pt")


def test_image_condition_keeps_the_reference_frame(tmp_path):
    ref = _image(tmp_path / "ref.png")
    reps = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left",
                             f"reference={ref}", STRATEGY))
    z = _latent(tmp_path / "out")
    given = load_reference(ref, 9, 10)[:, 0]  # the demo's latent is the video
    assert torch.equal(z[0, :, 0], given)  # edit ratio 0: exactly the reference
    assert not torch.equal(z[0, :, 2], given)  # edit ratio 0.5: regenerated from t = 500
    assert reps[0]["conditioning"]["mask_strategy"] == "0,0,0,0,1,0;0,0,0,2,1,0.5"
    # the key covers the reference's content: another image at the same path is another video
    _image(tmp_path / "ref.png", seed=1)
    generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left",
                      f"reference={ref}", STRATEGY))
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".mp4")]) == 2


def test_plain_prompt_unchanged_by_the_conditioning_fields(tmp_path):
    """No reference: the same latent and name as before conditioning existed (no extra noise drawn)."""
    a = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'a'}", "prompt=a red circle moves left"))
    assert "conditioning" not in a[0]
    b = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'b'}", "prompt=a red circle moves left", "loop=1"))
    assert os.path.basename(a[0]["output"]) == os.path.basename(b[0]["output"])


def test_prompt_options_in_a_prompts_file(tmp_path):
    ref = _image(tmp_path / "ref.png")
    pf = tmp_path / "prompts.txt"
    pf.write_text('a red circle moves left{"reference_path": "%s", "mask_strategy": "0"}\n'
                  "a blue square moves up\n" % ref)
    reps = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", f"prompts_file={pf}"))
    assert "conditioning" in reps[0] and "conditioning" not in reps[1]
    assert torch.equal(_latent(tmp_path / "out", 0)[0, :, 0], load_reference(ref, 9, 10)[:, 0])


def _record_latents(monkeypatch) -> list:
    """The final latent of every generate_one call (each loop's), in order."""
    import runner.generate as g

    latents, one = [], g.generate_one

    def recording(*args, **kwargs):
        out = one(*args, **kwargs)
        latents.append(out[1])
        return out

    monkeypatch.setattr(g, "generate_one", recording)
    return latents


def test_loop_3_stitches_without_the_repeated_frames(tmp_path, monkeypatch):
    latents = _record_latents(monkeypatch)
    reps = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left", "loop=3",
                             "condition_frame_length=2", "sampler.num_steps=2"))
    frames = read_video(output_stem(tmp_path / "out") + ".mp4")
    assert frames.shape[0] == 5 + 2 * (5 - 2)
    # each loop starts with the previous loop's last 2 frames, exactly (the demo's codec is the identity)
    assert len(latents) == 3
    for a, b in zip(latents, latents[1:]):
        assert torch.equal(b[:, :, :2], a[:, :, -2:]) and not torch.equal(b[:, :, 2:], a[:, :, :3])
    detail = reps[0]["conditioning_detail"]
    assert detail["loops"] == 3 and len(detail["earlier_loops"]) == 2
    # every loop is a new generation of 2 steps: the policy report of each covers 2 steps
    assert all(len(r["cache"]["pattern"]) == 2 for r in detail["earlier_loops"] if r["cache"].get("pattern"))


def test_condition_frame_edit_regenerates_the_carried_frames(tmp_path, monkeypatch):
    """condition_frame_edit=r: the frames a loop carries over are given only until t <= r * 1000, then
    re-noised and regenerated (0 keeps them exactly, as in the test above); the strategy in the key
    and report says so."""
    latents = _record_latents(monkeypatch)
    reps = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left", "loop=2",
                             "condition_frame_length=2", "condition_frame_edit=0.5"))
    a, b = latents
    assert not torch.equal(b[:, :, :2], a[:, :, -2:])  # regenerated from t = 500 on
    assert reps[0]["conditioning"]["mask_strategy"] == "1,0,-2,0,2,0.5"


@pytest.mark.slow  # 30 steps per policy: seconds each
@pytest.mark.parametrize("cache", ["adacache-moreg", "teacache", "fbcache", "deltadit", "pab246"])
def test_every_cache_policy_keeps_the_given_frames(tmp_path, cache):
    """The shipped demo model, 30 steps: the policy reuses some steps, the given frame stays the reference's."""
    ref = _image(tmp_path / "ref.png")
    reps = generate(make_cfg(*DEMO, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left",
                             f"reference={ref}", STRATEGY, f"cache={cache}"))
    assert torch.equal(_latent(tmp_path / "out")[0, :, 0], load_reference(ref, 16, 16)[:, 0])
    assert reps[0]["steps"]["reused"]["count"] > 0


def test_checkpointing_is_refused_with_conditioning(tmp_path, capsys):
    ref = _image(tmp_path / "ref.png")
    reps = generate(make_cfg(*BASE, f"output_dir={tmp_path / 'out'}", "prompt=a red circle moves left",
                             f"reference={ref}", "condition=image", "cache=adacache", "checkpoint.every_steps=1"))
    assert "have no step checkpoints" in capsys.readouterr().err
    assert reps[0]["checkpoint"]["supported"] is False
    assert not any(f.endswith(".ckpt") for f in os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("args,expect", [
    (("reference=missing.png", "condition=image"), "reference file not found"),
    (("reference=broken.png", "condition=image"), "cannot read reference image"),
    (("reference=ref.png", "mask_strategy='0,0,0,0,2'"), "too few frames for the strategy"),
    (("reference=ref.png", "mask_strategy='0,0,0,7,1'"), "outside the target"),
])
def test_bad_reference_exits_2_with_one_message_and_no_file(tmp_path, args, expect):
    _image(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-m", "runner.generate", *BASE, "output_dir=out", "prompt=a red circle",
                        *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0]
    assert not (tmp_path / "out").exists()


# ---- sharded (slow) ------------------------------------------------------------------------------


def _generate(rank, world, overrides):
    from runner.generate import generate as gen  # noqa: F811 - in the rank process
    from tests.helpers import make_cfg as mk

    return [(r["parallel"], r["cache"]) for r in gen(mk(*overrides))]


def _conditioned(tmp_path):
    return (f"reference={_image(tmp_path / 'ref.png')}", STRATEGY, "prompt=a red circle moves left")


# AdaCache needs a model whose residuals say something (the random init zeroes the metric's
# branch): the shipped demo model, 30 steps (its codebook), 8 frames of 16x16 (4 patch rows).
DEMO = tuple(a for a in BASE if not a.startswith(("model", "num_frames", "height", "width", "sampler"))) + (
    "model=demo", "num_frames=8", "height=16", "width=16", "sampler.num_steps=30")
RUNS = {"none": BASE, "adacache": (*DEMO, "cache=adacache"), "adacache-moreg": (*DEMO, "cache=adacache-moreg")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    out = {}
    for cache in RUNS:
        reps = generate(make_cfg(*RUNS[cache], *_conditioned(d), f"output_dir={d / cache}"))
        out[cache] = (_latent(d / cache), reps[0]["cache"])
    return d, out


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("layout,sp,cfg", [("dsp", 2, 1), ("dsp", 3, 1), ("ulysses", 2, 1), ("dsp", 1, 2),
                                          ("ulysses", 2, 2)])
def test_sharded_conditioned_equals_one_process(tmp_path, one_process, layout, sp, cfg):
    d, ref = one_process
    overrides = (*BASE, *_conditioned(d), f"output_dir={tmp_path / 'out'}", f"parallel.sp={sp}",
                 f"parallel.cfg={cfg}", f"parallel.layout={layout}")
    run_dist(_generate, sp * cfg, overrides, timeout=120)
    z = _latent(tmp_path / "out")
    assert _close(z, ref["none"][0])
    assert torch.equal(z[0, :, 0], ref["none"][0][0, :, 0])  # the given frame, bit for bit


@pytest.mark.slow
def test_sharded_loop_equals_one_process(tmp_path):
    loop = ("loop=2", "condition_frame_length=2", "prompt=a red circle moves left")
    generate(make_cfg(*BASE, *loop, f"output_dir={tmp_path / 'one'}"))
    run_dist(_generate, 2, (*BASE, *loop, f"output_dir={tmp_path / 'two'}", "parallel.sp=2"), timeout=120)
    assert _close(_latent(tmp_path / "two"), _latent(tmp_path / "one"))
    a, b = (read_video(output_stem(tmp_path / d) + ".mp4") for d in ("one", "two"))
    assert a.shape[0] == 8 and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("cache,sp", [("adacache", 2), ("adacache", 3), ("adacache-moreg", 2),
                                      ("adacache-moreg", 3)])
def test_adacache_conditioned_agrees_across_ranks(tmp_path, one_process, cache, sp):
    d, ref = one_process
    overrides = (*RUNS[cache], *_conditioned(d), f"output_dir={tmp_path / 'out'}", f"parallel.sp={sp}")
    results = run_dist(_generate, sp, overrides, timeout=120)
    (parallel, report), = results[0]
    # the same rates; the distances equal up to the float64 sums' order (another split of the rows)
    ours, one = report["decisions"], ref[cache][1]["decisions"]
    assert [(x["step"], x["rate"]) for x in ours] == [(x["step"], x["rate"]) for x in one]
    assert all(abs(x["c"] - y["c"]) <= 1e-9 * abs(y["c"]) for x, y in zip(ours, one))
    assert report["pattern"] == ref[cache][1]["pattern"]  # the same computed steps as one process
    assert "R" in report["pattern"]
    assert _close(_latent(tmp_path / "out"), ref[cache][0])
    cache = report
    for rank in parallel["collectives_per_rank"]:
        for step, ops in rank["per_step"].items():
            if cache["pattern"][int(step)] == "R":
                assert ops == {}, f"rank {rank['rank']} step {step}: a reused step ran {ops}"
            else:  # the layout's all-to-alls and at most the one agreement all-reduce
                assert ops["all_to_all"]["count"] > 0 and ops.keys() <= {"all_to_all", "all_reduce"}
                assert ops.get("all_reduce", {"count": 1})["count"] == 1


# ---- Open-Sora 1.2 (tiny random weights in the published layout) ---------------------------------


@pytest.mark.slow  # builds the Open-Sora pipeline (tiny T5 and VAE) three times
def test_opensora_image_condition_and_loop(weights_dir, tmp_path):
    """The VAE family: the reference is encoded with a sampled posterior (generator seeded by the
    prompt's seed), its latent frame stays exact; loop=2 with one VAE chunk carried over stitches
    34 + (34 - 17) frames."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from runner.families.opensora import build_opensora_pipeline

    ref = _image(tmp_path / "ref.png", size=(40, 52))
    common = ("model=opensora-v1.2", f"model.weights_dir={weights_dir}", "height=32", "width=48", "num_frames=34",
              "sampler.num_steps=2", "progress=false", "save_latent=true", "device=cpu", "prompt=a cat")
    reps = generate(make_cfg(*common, f"output_dir={tmp_path / 'a'}", f"reference={ref}", "condition=image"))
    cfg = make_cfg(*common)
    pipe = build_opensora_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(reps[0]["seed"])
    expected = pipe.encode_video(load_reference(ref, 32, 48)[None], gen)[0]
    z = _latent(tmp_path / "a")
    assert z.shape[2] == 10 and torch.equal(z[0, :, 0], expected[:, 0])
    generate(make_cfg(*common, f"output_dir={tmp_path / 'b'}", "loop=2"))
    assert read_video(output_stem(tmp_path / "b") + ".mp4").shape[0] == 34 + 17
