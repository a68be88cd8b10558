"""The demo training recipe (runner.demo.train): checkpoint written, loadable, resume bit-exact."""

import os

import pytest
import torch

from models.loading import read_safetensors
from runner.config import ModelConfig
from runner.families import build_pipeline
from runner.sampler import shift_timestep
from runner.demo.train import (DemoArch, TrainConfig, build_demo, init_weights_from, learning_rate, sample_t,
                               shift_ratio, train)
from tests.helpers import TINY_TRAIN


def _weights(path):
    return read_safetensors(os.path.join(path, "dit.safetensors"))


def test_a_patch_wider_than_the_model_is_refused():
    # 4x4x4 RGB patches are 192 values: a 96-wide model would leave half of the noise in the video
    with pytest.raises(ValueError, match="hidden_size >= 192"):
        train(TrainConfig(**{**TINY_TRAIN, "arch": DemoArch(patch_size=[4, 4, 4], hidden_size=96)}, steps=1))


def test_shift_moves_timesteps_towards_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(shift_timestep(t, 3.0, num_timesteps=1), torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0]))
    assert torch.equal(shift_timestep(t, 1.0, num_timesteps=1), t)


def test_resume_continues_bit_exactly_and_the_checkpoint_generates(tmp_path):
    full = str(tmp_path / "full")
    res = train(TrainConfig(steps=4, output_dir=full, save_every=100, **TINY_TRAIN))
    assert res["steps"] == 4
    part = str(tmp_path / "part")
    train(TrainConfig(steps=2, output_dir=part, save_every=100, **TINY_TRAIN))
    first = _weights(part)
    train(TrainConfig(steps=4, output_dir=part, save_every=100, resume=True, **TINY_TRAIN))
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[k], b[k]) for k in b)  # the resumed steps did train
    pipe = build_pipeline(ModelConfig(family="demo", weights=full), torch.device("cpu"), torch.float32)
    assert not pipe.random_weights
    # each save records the caption response of the weights it writes
    import json

    with open(os.path.join(full, "config.json")) as f:
        response = json.load(f)["training"]["response"]
    assert [r["pair"] for r in response] == ["colour", "shape", "direction left/right", "direction up/down"]
    assert all(r["gain"] > 0 and -1 <= r["cosine"] <= 1 for r in response)
    cond = pipe.encode_text(["a red circle moves left on a dark background"])
    z = torch.randn(2, 3, 4, 16, 16)
    out = pipe.dit(z, torch.full((2,), 500.0), cond.y, cond.mask, fps=24, height=16, width=16)
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_learning_rate_warms_up_holds_and_decays_to_zero():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, decay_steps=20)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == 1.0 and abs(lrs[90] - 0.5) < 1e-12 and abs(lrs[99] - 0.05) < 1e-12
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(TrainConfig(steps=100, lr=1.0, warmup=10, decay_steps=0), 99) == 1.0


def test_shift_phases():
    cfg = TrainConfig(t_shift=[3.0, 8.0], t_shift_from=[10, 20])
    assert [shift_ratio(cfg, s) for s in (0, 9, 10, 19, 20, 99)] == [1.0, 1.0, 3.0, 3.0, 8.0, 8.0]
    with pytest.raises(ValueError):
        shift_ratio(TrainConfig(t_shift=[3.0, 8.0], t_shift_from=[20, 10]), 0)


def test_recipe_defaults_are_the_shipped_run_plus_frame_masks_and_width():
    # The defaults are the next recipe (issue 17): the shipped run's, plus frame masks and a wider
    # model. The shipped run's recorded config still loads, and with its own width and no masks it is
    # the recipe it was trained with. (The shipped run was resumed with other settings of `steps` and
    # `decay_steps` on the way; what must hold is the same data, model and per-step lr and shift.)
    import dataclasses
    import json

    from runner.families import BUILTIN

    with open(os.path.join(BUILTIN["demo"], "config.json")) as f:
        shipped = json.load(f)["training"]
    rec = dict(shipped["config"])
    shipped_cfg = TrainConfig(**{**rec, "arch": DemoArch(**rec["arch"])}, mask_ratios=None)
    ours = TrainConfig()
    assert ours.steps == shipped["step"]
    # what the new recipe adds, and nothing else: every recorded setting is still a setting
    assert set(dataclasses.asdict(ours)) - set(rec) == {"mask_ratios", "init_from", "masked_start"}
    assert ours.mask_ratios is not None and ours.init_from == "" and ours.masked_start is None
    assert dataclasses.replace(ours.arch, hidden_size=96) == shipped_cfg.arch and ours.arch.hidden_size == 144
    # Not compared: where and how the run was driven (output_dir, resume, progress, logging, saving,
    # max_minutes). The recorded output_dir is where it was trained (/work/demo_run4/demo), not
    # assets/demo: the finished run was copied there, the step runner.demo.ship now performs.
    same = ("batch_size", "lr", "warmup", "ema_decay", "cfg_dropout", "num_frames", "size", "seed",
            "data_start", "t_uniform_until", "t_uniform_min", "t_uniform_share")
    assert all(getattr(ours, k) == getattr(shipped_cfg, k) for k in same)
    steps = range(ours.steps)
    assert [learning_rate(ours, s) for s in steps] == [learning_rate(shipped_cfg, s) for s in steps]
    assert [shift_ratio(ours, s) for s in steps] == [shift_ratio(shipped_cfg, s) for s in steps]


def test_init_from_loads_a_checkpoint_of_the_same_architecture(tmp_path):
    src = str(tmp_path / "src")
    train(TrainConfig(steps=1, output_dir=src, save_every=100, **TINY_TRAIN))
    pipe = build_demo(TINY_TRAIN["arch"], seed=5)
    init_weights_from(pipe, src)
    saved = _weights(src)
    assert all(torch.equal(saved[k], v) for k, v in pipe.dit.state_dict().items())
    other = build_demo(DemoArch(depth=1, hidden_size=48, patch_size=[1, 2, 2], num_heads=2, text_width=16,
                                text_depth=1, text_heads=2), seed=0)
    with pytest.raises(ValueError, match="another architecture"):
        init_weights_from(other, src)


def test_timesteps_high_noise_phase_then_share():
    def draw(cfg, step, seed=0, b=4000):
        return sample_t(cfg, step, b, torch.Generator().manual_seed(seed))

    plain = TrainConfig(t_shift=[3.0], t_shift_from=[0], t_uniform_until=0, t_uniform_share=0.0)
    # without the phase: exactly the shifted logit-normal t (the recipe's draws are unchanged)
    expected = shift_timestep(torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0))), 3.0,
                              num_timesteps=1)
    assert torch.equal(draw(plain, 5), expected)
    cfg = TrainConfig(t_shift=[3.0], t_shift_from=[0], t_uniform_until=10, t_uniform_min=0.9, t_uniform_share=0.25)
    phase = draw(cfg, 9)
    assert phase.min() >= 0.9 and phase.max() <= 1.0 and abs(phase.mean().item() - 0.95) < 0.005
    after = draw(cfg, 10)
    share_high = (after >= 0.9).float().mean().item()
    plain_high = (expected >= 0.9).float().mean().item()
    # a quarter drawn from U[0.9, 1], the rest logit-normal (of which plain_high lie above 0.9 too)
    assert abs(share_high - (0.25 + 0.75 * plain_high)) < 0.03
    with pytest.raises(ValueError, match="t_uniform"):
        train(TrainConfig(**{**TINY_TRAIN, "t_uniform_share": 1.5}, steps=1))
    with pytest.raises(ValueError, match="data_start"):
        train(TrainConfig(**{**TINY_TRAIN, "data_start": "middle"}, steps=1))
