"""TeaCache and First-Block-Cache rules on hand-built inputs, and on the tiny STDiT3: the recorded
distances are the ones computed by hand from the model's own intermediate tensors, and a reused
step adds the cached residual to this step's state."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from runner.cache import FBCache, FBCacheConfig, TeaCache, TeaCacheConfig
from runner.cache.teacache import OPENSORA_COEFFICIENTS, Accumulator, poly
from runner.sampler import StepInfo
from tests.cache_util import inputs, run, tiny_model
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

IDENTITY_POLY = (0.0, 0.0, 0.0, 1.0, 0.0)  # poly(x) = x


def test_poly_is_numpy_poly1d_highest_power_first():
    for x in (0.0, 0.03, 0.1, 0.37):
        assert poly(OPENSORA_COEFFICIENTS, x) == pytest.approx(float(np.poly1d(OPENSORA_COEFFICIENTS)(x)), rel=1e-12)
    assert poly(OPENSORA_COEFFICIENTS, 0.0) == pytest.approx(4.84426240e-02)


def test_teacache_accumulation_first_and_last_computed():
    rule = Accumulator(0.1, IDENTITY_POLY)
    rels = [None, 0.04, 0.04, 0.04, 0.09, 0.02, 0.5, 0.01, None]
    got = [rule.step(k, len(rels), r)[0] for k, r in enumerate(rels)]
    # acc: .04 R, .08 R, .12 C(reset), .09 R, .11 C, .5 C, .01 R, last forced C
    assert got == [True, False, False, True, False, True, True, False, True]
    # an undefined distance (|F_prev| = 0) computes, even under a polynomial that would send it to -inf
    rule = Accumulator(0.1, (-1.0, 0.0))
    assert [rule.step(k, 4, float("inf") if 0 < k < 3 else None)[0] for k in range(4)] == [True] * 4
    # the Open-Sora polynomial: rel 0 still adds poly(0) = 0.0484, so delta 0.1 allows at most two
    # reuses in a row (0.0969 < 0.1 <= 0.1453)
    rule = Accumulator(0.1, OPENSORA_COEFFICIENTS)
    assert [rule.step(k, 7, 0.0 if 0 < k < 6 else None)[0] for k in range(7)] == [True, False, False, True, False,
                                                                                  False, True]


def test_teacache_thresholds_from_speed_and_named_configs():
    assert TeaCache(TeaCacheConfig(speed="slow")).delta == 0.1
    assert TeaCache(TeaCacheConfig(speed="fast")).delta == 0.2
    assert TeaCache(TeaCacheConfig(teacache_thresh=0.15)).delta == 0.15
    with pytest.raises(ValueError, match="TeaCache knows slow"):
        TeaCache(TeaCacheConfig(speed="medium"))
    assert make_cfg("cache=teacache").cache.speed == "fast"
    assert make_cfg("cache=teacache-slow").cache.speed == "slow"
    fb = make_cfg("cache=fbcache").cache
    assert fb.name == "fbcache" and fb.fbcache_threshold == 0.05
    with pytest.raises(ValueError, match="fbcache_threshold"):
        FBCache(FBCacheConfig(fbcache_threshold=0.0))


@torch.no_grad()
def test_teacache_distance_is_block0_modulated_input_and_reuse_adds_the_stack_residual():
    z, y, mask = inputs()
    model = tiny_model()
    seen = []  # spatial block 0's attention input (= the modulated input) on every step it runs
    model.spatial_blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    stage_io = []
    policy = TeaCache(TeaCacheConfig(speed="fast"))
    policy.install(model)
    stage = policy.blocks  # the blocks stage's input and output on every step, computed or reused
    policy.blocks = lambda e, step: stage_io.append((e.x.clone(), stage(e, step))) or stage_io[-1][1]
    run(model, policy, z, y, mask)
    rep = policy.report()
    pattern = rep["pattern"]
    assert pattern[0] == "C" and pattern[-1] == "C" and 0 < pattern.count("R") < 28
    computed = [k for k, c in enumerate(pattern) if c == "C"]
    assert len(seen) == len(computed)
    # The first decision (step 1) compares step 1's modulated input with step 0's.
    f0 = seen[0]
    e1_x = stage_io[1][0]
    blk = model.spatial_blocks[0]
    mod = (blk.scale_shift_table[None] + _t_mlp_of(model, 1, z))[:, :2, None, None, :]
    f1 = blk.norm1(e1_x) * (1 + mod[:, 1]) + mod[:, 0]
    want = ((f1 - f0).abs().sum() / f0.abs().sum()).item()
    assert rep["decisions"][0]["step"] == 1 and rep["decisions"][0]["rel_l1"] == pytest.approx(want, rel=1e-5)
    # the accumulator in the report is the running sum since the last computed step
    acc = 0.0
    for d in rep["decisions"]:
        acc += poly(OPENSORA_COEFFICIENTS, d["rel_l1"])
        assert d["acc"] == pytest.approx(acc, rel=1e-9)
        reused = pattern[d["step"]] == "R"
        assert reused == (acc < 0.2)
        if not reused:
            acc = 0.0
    # a reused step returns x_emb + (out - in) of the last computed step
    k = pattern.index("R")
    last_c = max(c for c in computed if c < k)
    x_in, x_out = stage_io[last_c]
    torch.testing.assert_close(stage_io[k][1], stage_io[k][0] + (x_out - x_in), rtol=1e-6, atol=1e-6)
    # held: the fp32 stack residual and the previous modulated input (fp32 model), freed after the last step
    assert rep["bytes_held"] == 0 and rep["bytes_held_peak"] == 2 * stage_io[0][0].numel() * 4


def _t_mlp_of(model, k, z):
    """t_mlp of step k of the linear 30-step schedule (the cache_util default), for a [cond; uncond] batch."""
    t = torch.full((2,), 1000.0 * (1 - k / 30))
    tt = model.t_embedder(t.to(model.dtype)) + model.fps_embedder(torch.full((2,), 24.0))
    return model.t_block(tt).reshape(2, 6, -1)


# ------------------------------------------------------------------------- FBCache, hand-built


class AddBlock(nn.Module):
    """x + r (r set from outside per step); counts its calls."""

    def __init__(self):
        super().__init__()
        self.r, self.calls = None, 0

    def forward(self, x, y, y_mask, t_mlp):
        self.calls += 1
        return x + self.r


class FakeDiT(nn.Module):
    def __init__(self, n_layers=3):
        super().__init__()
        self.spatial_blocks = nn.ModuleList(AddBlock() for _ in range(n_layers))
        self.temporal_blocks = nn.ModuleList(AddBlock() for _ in range(n_layers))

    def blocks(self, e):
        x = e.x
        for s, t in zip(self.spatial_blocks, self.temporal_blocks):
            x = t(s(x, None, None, None), None, None, None)
        return x


def _embedded(x):
    return SimpleNamespace(x=x, y=None, y_mask=None, t_mlp=None)


def test_fbcache_threshold_against_the_last_computed_reference():
    m = FakeDiT()
    policy = FBCache(FBCacheConfig(fbcache_threshold=0.05))
    policy.install(m)
    shape = (1, 2, 3, 4)
    ones = torch.ones(shape)
    # layer 0's residual r1 = s0.r + t0.r; the tail adds 10 per block from layer 1 on
    for blk in list(m.spatial_blocks[1:]) + list(m.temporal_blocks[1:]):
        blk.r = 10 * ones
    m.temporal_blocks[0].r = torch.zeros(shape)
    # relative change of r1 against the reference of the last computed step:
    # step 1: 4% -> reuse; step 2: 4.9% (still against step 0) -> reuse; step 3: 6% -> compute;
    # step 4: 1.02 vs ref 1.06 -> 3.8% -> reuse
    r1 = [1.0, 1.04, 1.049, 1.06, 1.02]
    outs = []
    for k, r in enumerate(r1):
        m.spatial_blocks[0].r = r * ones
        x = torch.full(shape, float(k))
        outs.append(policy.blocks(_embedded(x), StepInfo(k, len(r1), 1000.0 - k)))
        if policy.computed[k]:
            torch.testing.assert_close(outs[-1], x + r + 40)  # 4 tail blocks of +10
        else:
            torch.testing.assert_close(outs[-1], x + r + 40)  # h1 + the cached tail residual (40)
    rep = policy.report()
    assert rep["pattern"] == "CRRCR"
    assert [d["rel_l1"] for d in rep["decisions"]] == pytest.approx([0.04, 0.049, 0.06, 0.04 / 1.06], rel=1e-5)
    assert m.spatial_blocks[1].calls == 2  # the tail ran on the computed steps only
    assert m.spatial_blocks[0].calls == 5 and m.temporal_blocks[0].calls == 5  # layer 0 runs every step
    # a changed tail is not seen on reused steps: the cached residual, not the blocks, is added
    assert rep["num_computed"] == 2 and rep["bytes_held"] == 0  # freed after the last step


def test_fbcache_reuses_the_stale_tail_not_the_current_one():
    m = FakeDiT(2)
    policy = FBCache(FBCacheConfig())
    policy.install(m)
    ones = torch.ones(1, 1, 2, 2)
    m.spatial_blocks[0].r, m.temporal_blocks[0].r = ones, 0 * ones
    m.spatial_blocks[1].r, m.temporal_blocks[1].r = 3 * ones, 0 * ones
    policy.blocks(_embedded(0 * ones), StepInfo(0, 3, 1000.0))
    m.spatial_blocks[1].r = 100 * ones  # the tail changed, layer 0 did not: FBCache cannot see it
    out = policy.blocks(_embedded(0 * ones), StepInfo(1, 3, 990.0))
    torch.testing.assert_close(out, 4 * ones)
    assert policy.report()["pattern"] == "CR" and policy.bytes_held() > 0


@torch.no_grad()
def test_fbcache_on_the_tiny_model_first_step_only_and_all_steps():
    z, y, mask = inputs()
    plain = run(tiny_model(), None, z, y, mask)
    for thr, want in ((1e-9, "C" * 30), (1e9, "C" + "R" * 29)):
        model = tiny_model()
        policy = FBCacheConfig(fbcache_threshold=thr).build()
        policy.install(model)
        out = run(model, policy, z, y, mask)
        assert policy.report()["pattern"] == want
        if thr < 1:
            torch.testing.assert_close(out, plain, rtol=0, atol=0)
        else:
            assert not torch.allclose(out, plain, atol=1e-3)
    assert FBCacheConfig().fbcache_threshold == 0.05


NAMED = ["teacache", "teacache-slow", "fbcache", "deltadit", "deltadit-port", "pab246", "pab357", "pab579"]


def test_generate_runs_and_reports_every_named_policy(tmp_path):
    import json

    from runner.generate import generate

    for name in NAMED:
        (rep,) = generate(make_cfg("prompt=a red circle moves left", f"output_dir={tmp_path / name}", "num_frames=4",
                                   "height=16", "width=16", "sampler.num_steps=6", "progress=false", f"cache={name}"))
        saved = json.loads(open(rep["output"][:-4] + ".json").read())["cache"]
        assert saved["policy"] == ("pab" if name.startswith("pab") else name.split("-")[0]), name
        assert len(saved["pattern"]) == 6 and saved["pattern"][0] == "C", name
        assert 0 < saved["computed_fraction"] <= 1 and saved["bytes_held"] == 0 and saved["bytes_held_peak"] > 0, name


def test_config_validation_of_the_peer_policies():
    from runner.config import UserError, validate

    for name, bad, msg in [("teacache", "cache.teacache_thresh=0", "teacache_thresh"),
                           ("fbcache", "cache.fbcache_threshold=-1", "fbcache_threshold"),
                           ("deltadit", "cache.deltadit_rule=faster", "deltadit_rule"),
                           ("deltadit", "cache.deltadit_span=3", "both"),
                           ("deltadit", "cache.deltadit_speedup=0.9", "deltadit_speedup"),
                           ("pab246", "cache.pab_ranges=[2,4]", "pab_ranges"),
                           ("pab246", "cache.pab_window=[930,450]", "pab_window"),
                           ("none", "cache.name=fastercache", "pab246")]:
        with pytest.raises(UserError, match=msg):
            validate(make_cfg(f"cache={name}", "prompt=x", bad))
    validate(make_cfg("cache=deltadit", "prompt=x", "cache.deltadit_interval=3", "cache.deltadit_span=20"))
