"""Frame masks in the demo training recipe (issue 17 item 5): the mask generator's shares and kinds,
given frames clean in x_t and outside the loss, resume bit-exact with masks on."""

import os

import numpy as np
import pytest
import torch

from models.loading import read_safetensors
from runner.demo import data as dd, judge
from runner.demo.train import (MaskRatios, TrainConfig, build_demo, frame_masks, mask_shares, rf_loss,
                               state_path, train, training_batch)
from tests.helpers import TINY_TRAIN

NONE = dict(first_frame=0.0, first_k=0.0, last_k=0.0, first_last=0.0, random=0.0)


def _only(kind: str) -> MaskRatios:
    return MaskRatios(**{**NONE, kind: 1.0})


def test_shares_over_many_draws():
    # kinds whose masks cannot be confused: frame 0 alone given, a tail given, nothing given
    ratios = MaskRatios(**{**NONE, "first_frame": 0.2, "last_k": 0.3})
    assert mask_shares(ratios)["identity"] == pytest.approx(0.5)
    m = frame_masks(ratios, 20000, 8, np.random.default_rng(0))
    given = ~m
    head = given[:, 0] & ~given[:, 1:].any(1)
    tail = ~given[:, 0] & given[:, -1]
    none = ~given.any(1)
    assert bool((head | tail | none).all())
    # binomial sd at n = 20000 is <= 0.0036; 0.015 is 4 sd
    assert abs(head.float().mean().item() - 0.2) < 0.015
    assert abs(tail.float().mean().item() - 0.3) < 0.015
    assert abs(none.float().mean().item() - 0.5) < 0.015
    # the default recipe: half the samples unmasked, the rest spread over all kinds
    d = mask_shares(MaskRatios())
    assert d["identity"] == pytest.approx(0.5) and all(v > 0 for v in d.values())


def test_each_kind_gives_the_frames_it_names():
    rng = np.random.default_rng(1)
    n, t = 4000, 8
    m = frame_masks(_only("first_frame"), n, t, rng)
    assert bool((~m[:, 0]).all() and m[:, 1:].all())
    k = (~frame_masks(_only("first_k"), n, t, rng)).sum(1)
    assert sorted(k.unique().tolist()) == [1, 2, 3, 4]  # up to T/2: extension gives the first 4 of 8
    assert all(abs((k == i).float().mean().item() - 0.25) < 0.03 for i in range(1, 5))
    m = frame_masks(_only("first_k"), n, t, rng)
    assert bool((m[:, 1:] >= m[:, :-1]).all())  # a prefix is given
    m = frame_masks(_only("last_k"), n, t, rng)
    assert bool((m[:, 1:] <= m[:, :-1]).all() and (~m[:, -1]).all() and m[:, :4].all())
    m = frame_masks(_only("first_last"), n, t, rng)
    assert bool((m == m.flip(1)).all() and (~m[:, 0]).all() and m[:, 2:6].all())
    m = frame_masks(_only("random"), n, t, rng)
    assert bool(m.any(1).all())  # at least one frame left to generate
    assert abs((~m).float().mean().item() - 0.5) < 0.03  # p ~ U[0.1, 0.9]
    # a single frame cannot be conditioned on itself
    assert bool(frame_masks(_only("first_frame"), 10, 1, rng).all())
    with pytest.raises(ValueError, match="mask_ratios"):
        mask_shares(MaskRatios(first_frame=0.7, first_k=0.7))
    with pytest.raises(ValueError, match="mask_ratios"):
        train(TrainConfig(**{**TINY_TRAIN, "mask_ratios": MaskRatios(random=-0.1)}, steps=1))


def test_masks_are_a_pure_function_of_the_seed():
    a = frame_masks(MaskRatios(), 64, 8, np.random.default_rng([3, 1]))
    b = frame_masks(MaskRatios(), 64, 8, np.random.default_rng([3, 1]))
    assert torch.equal(a, b) and not a.all()


class _Oracle(torch.nn.Module):
    """Stands in for the DiT: returns the exact target v = x0 - eps on generated frames (eps recovered
    from x_t) and 100 on given ones; records what it was called with."""

    def __init__(self, dit, x0):
        super().__init__()
        self.dit, self.x0, self.calls = dit, x0, []
        self.null_caption = dit.null_caption

    def forward(self, xt, timestep, y, mask, fps, height, width, x_mask=None):
        self.calls.append((xt.clone(), timestep.clone(), x_mask))
        t = (timestep / 1000)[:, None, None, None, None]
        v = self.x0 - (xt - (1 - t) * self.x0) / t
        if x_mask is not None:
            v = torch.where(x_mask[:, None, :, None, None], v, torch.full_like(v, 100.0))
        return v


def test_given_frames_are_clean_in_x_t_and_left_out_of_the_loss():
    cfg = TrainConfig(**TINY_TRAIN)
    pipe = build_demo(cfg.arch, 0)
    x0 = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    x_mask = torch.tensor([[False, True, True, True], [False, False, True, True], [True, True, True, True]])
    pipe.dit = _Oracle(pipe.dit, x0)
    loss = rf_loss(pipe, x0, ["a red circle moves left"] * 3, cfg, torch.Generator().manual_seed(0), 5, x_mask)
    xt, timestep, seen = pipe.dit.calls[0]
    assert seen is x_mask
    given = ~x_mask[:, None, :, None, None].expand_as(x0)
    assert torch.equal(xt[given], x0[given])  # exactly clean
    assert (xt[~given] - x0[~given]).abs().mean() > 0.05  # noised
    # the output on given frames is 100 against a target of |x0 - eps| ~ 1: in the loss it would be ~10^3
    assert loss.shape == (3,) and loss.max().item() < 1e-8
    # the same draws without a mask: the given frames' noise is back in x_t and in the loss
    pipe.dit.calls.clear()
    plain = rf_loss(pipe, x0, ["a red circle moves left"] * 3, cfg, torch.Generator().manual_seed(0), 5)
    xt2, timestep2, seen2 = pipe.dit.calls[0]
    assert seen2 is None and torch.equal(timestep2, timestep) and torch.equal(xt2[~given], xt[~given])
    assert plain.max().item() < 1e-8 and not torch.equal(xt2[given], x0[given])


def test_an_all_generated_mask_is_the_plain_loss():
    cfg = TrainConfig(**TINY_TRAIN)
    pipe = build_demo(cfg.arch, 0)
    x0 = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    caps = ["a red circle moves left", "a blue square stays still"]
    plain = rf_loss(pipe, x0, caps, cfg, torch.Generator().manual_seed(0), 5)
    full = rf_loss(pipe, x0, caps, cfg, torch.Generator().manual_seed(0), 5, torch.ones(2, 4, dtype=torch.bool))
    assert plain.shape == (2,) and torch.allclose(plain, full, rtol=1e-6, atol=0)


def _weights(path):
    return read_safetensors(os.path.join(path, "dit.safetensors"))


def test_resume_with_masks_is_bit_exact(tmp_path):
    # every sample masked, with random sizes, so a mask stream restarted on resume would differ
    ratios = MaskRatios(first_frame=0.0, first_k=0.5, last_k=0.0, first_last=0.0, random=0.5)
    kw = dict(TINY_TRAIN, mask_ratios=ratios, save_every=100)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(TrainConfig(steps=4, output_dir=full, **kw))
    train(TrainConfig(steps=2, output_dir=part, **kw))
    assert "mask_rng" in torch.load(state_path(TrainConfig(output_dir=part)), weights_only=False)
    train(TrainConfig(steps=4, output_dir=part, resume=True, **kw))
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the masks do change the training: the same run without them ends elsewhere
    nomask = str(tmp_path / "nomask")
    train(TrainConfig(steps=4, output_dir=nomask, **{**kw, "mask_ratios": None}))
    c = _weights(nomask)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_masked_start_moves_only_the_samples_with_given_frames():
    def batch(masked_start):
        cfg = TrainConfig(batch_size=64, num_frames=8, size=32, masked_start=masked_start)
        return training_batch(cfg, np.random.default_rng(5), np.random.default_rng([5, 1]))

    x0, captions, x_mask = batch(None)
    y0, captions_inside, y_mask = batch("inside")
    assert captions == captions_inside and torch.equal(x_mask, y_mask)
    given = ~x_mask.all(1)
    assert 0 < given.sum() < 64
    assert torch.equal(x0[~given], y0[~given])  # text-to-video samples: the edge recipe's clips

    # given frames: edge starts put every moving shape within the first 0.3 of its axis; inside ones
    # are spread along it
    def starts(clips, rows):
        out = []
        for i in np.flatnonzero(rows.numpy()):
            p = dd.parse_caption(captions[i])
            if p["motion"] == "still":
                continue
            centres, _ = judge.track(clips[i], p["colour"])
            dx, dy = dd.DIRECTIONS[p["motion"]]
            along = centres[0, 0] if dx else centres[0, 1]
            out.append(along if (dx or dy) > 0 else 1 - along)  # distance from the edge it leaves
        return np.array(out)

    edge, inside = starts(x0, given), starts(y0, given)
    assert len(edge) > 5 and edge.max() < 0.3
    assert (inside > 0.3).mean() > 0.3
    with pytest.raises(ValueError, match="masked_start must be one of"):
        train(TrainConfig(**{**TINY_TRAIN, "masked_start": "middle"}, steps=1))
