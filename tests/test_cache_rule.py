"""AdaCache's rule on a scripted stand-in model: codebooks, forced steps, when a rate applies,
MoReg values and window edges, and the configuration. Pure logic, one process."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runner.cache import AdaCache, AdaCacheConfig, NoCache, NoCacheConfig
from runner.cache.codebook import PUBLISHED, Codebook, moreg_window, select_codebook
from runner.cache.metric import MoRegParams, decide, motion_sums
from runner.config import UserError, validate
from runner.sampler import StepInfo
from tests.cache_util import cache_cfg
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------ codebooks


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_codebook_lookup_at_and_around_every_threshold(key):
    released = PUBLISHED[key]
    cb = Codebook.from_released(released, "x")
    keys, rates = list(released), list(released.values())
    # The released comparison chain: c < k0 -> r0, ..., c < k4 -> r4, else r5 (k5 = 1.00 never compared).
    for i, th in enumerate(keys[:-1]):
        below = math.nextafter(th, -math.inf)
        assert cb.rate(below) == rates[i]
        assert cb.rate(th) == rates[i + 1]  # strict "<": the threshold itself belongs to the next bin
        assert cb.rate(th + 1e-9) == rates[i + 1]
    assert cb.rate(0.0) == rates[0]
    assert cb.rate(1.0) == rates[-1] and cb.rate(7.0) == rates[-1] and cb.rate(math.inf) == rates[-1]
    assert cb.rate(float("nan")) == rates[-1]


def test_published_codebooks_and_selection_by_steps():
    assert select_codebook(30, "fast").rates == (6, 5, 4, 3, 2, 1)
    assert select_codebook(30, "fast").thresholds == (0.08, 0.16, 0.24, 0.32, 0.40)
    assert select_codebook(30, "slow").rates == (3, 2, 1, 1, 1, 1)
    cb100 = select_codebook(100, "fast")
    assert cb100.thresholds == (0.03, 0.05, 0.07, 0.09, 0.11) and cb100.rates == (12, 10, 8, 6, 4, 3)
    assert cb100.exact and cb100.source == "published 100-step fast"
    # No published codebook: the nearest step count, said so; ties go to the smaller (more conservative).
    for n, want in [(50, 30), (64, 30), (65, 30), (66, 100), (200, 100), (10, 30)]:
        cb = select_codebook(n, "fast")
        assert cb.source.startswith(f"published {want}-step fast") and not cb.exact and "nearest" in cb.source
    assert select_codebook(100, "slow").source.startswith("published 30-step slow")
    assert select_codebook(50, "fast", codebook_steps=100).rates == (12, 10, 8, 6, 4, 3)
    custom = select_codebook(30, thresholds=[0.1, 0.2], rates=[3, 2, 1])
    assert custom.rate(0.05) == 3 and custom.rate(0.15) == 2 and custom.rate(0.2) == 1 and custom.source == "custom"
    with pytest.raises(ValueError, match="no published slow codebook for 100"):
        select_codebook(100, "slow", codebook_steps=100)
    with pytest.raises(ValueError, match="one more rate"):
        Codebook((0.1, 0.2), (1, 2))


def test_moreg_window_published_and_scaled():
    assert moreg_window(30) == (4, 26) and moreg_window(100) == (10, 90)
    assert moreg_window(50) == (7, 43)  # nearest published (30) scaled: 4*50/30, 26*50/30
    assert moreg_window(80) == (8, 72)  # from (10, 90) of 100 steps
    assert moreg_window(30, [2, 5]) == (2, 5)


# ------------------------------------------------------------------------------ scripted model


class Tapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_delta, self.cross_delta, self.mlp_delta = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn, self.cross_attn, self.mlp = nn.Identity(), nn.Identity(), nn.Identity()


class ScriptedDiT(nn.Module):
    """Stands in for STDiT3's block stage: the metric residual at computed step s is a constant
    tensor whose value follows `target`, chosen so that the distance c at s equals target(s)."""

    def __init__(self, target, shape=(2, 3, 4, 5), depth=2):
        super().__init__()
        self.spatial_blocks = nn.ModuleList(Tapped() for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(Tapped() for _ in range(depth))
        self.target, self.shape, self.value, self.policy = target, shape, 1.0, None
        self.calls = []

    def blocks(self, e):
        s = self.policy.index + 1
        self.calls.append(s)
        if s > 1:  # |v_prev - v_cur| / |v_prev| / rate_prev = target
            self.value *= 1 + self.target(s) * self.policy.rate
        r = torch.full(self.shape, self.value)
        for blk in list(self.spatial_blocks) + list(self.temporal_blocks):
            blk.attn_delta(r)
            blk.cross_delta(r)
            blk.mlp_delta(r)
        return e.x + 1.0


class E:
    def __init__(self, x):
        self.x = x


def drive(target, n=30, **kw):
    model = ScriptedDiT(target)
    pol = AdaCache(cache_cfg(**kw))
    pol.install(model)
    model.policy = pol
    outs = []
    for i in range(n):
        outs.append(pol.blocks(E(torch.zeros(1)), StepInfo(i, n, 0.0)))
    return pol, model, outs


def computed(pol):
    return pol.report()["computed_steps"]


def test_forced_steps_first_two_and_last_two():
    # c = 0 everywhere -> rate 6: 1-based computed steps 1, 2, 8, 14, 20, 26 and the forced 29, 30.
    pol, model, _ = drive(lambda s: 0.0)
    assert computed(pol) == [0, 1, 7, 13, 19, 25, 28, 29]
    assert model.calls == [1, 2, 8, 14, 20, 26, 29, 30]
    assert pol.report()["pattern"] == "CC" + "RRRRRC" * 4 + "RRCC"
    for n, want in [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (9, [0, 1, 7, 8])]:
        assert computed(drive(lambda s: 0.0, n=n)[0]) == want, n
    # Large distance -> rate 1: everything computes.
    assert computed(drive(lambda s: 5.0)[0]) == list(range(30))


def test_rate_applies_from_the_next_step_and_normalises_by_the_previous_rate():
    script = {2: 0.35, 4: 0.05, 10: 0.5, 11: 0.2}  # -> rates 2, 6, 1, 4
    pol, _, outs = drive(lambda s: script.get(s, 0.5))
    # s=2 decides rate 2: s=3 is reused although the rate in force at s=2 was 1 (2 + 1 = 3).
    assert computed(pol)[:6] == [0, 1, 3, 9, 10, 14]
    d = {x.step: x for x in pol.decisions}
    assert (d[1].rate_prev, d[1].rate) == (1, 2)
    assert (d[3].rate_prev, d[3].rate) == (2, 6)
    assert d[3].rel_l1[0] == pytest.approx(0.10) and d[3].c == pytest.approx(0.05)  # c = rel_l1 / rate_prev
    assert (d[9].rate_prev, d[9].rate) == (6, 1) and (d[10].rate_prev, d[10].rate) == (1, 4)
    assert 29 not in d and 0 not in d  # no decision without a previous residual, none at the last step
    # A reused step returns the input plus the stored whole-stack residual (here exactly 1).
    assert all(torch.equal(o, torch.ones(1)) for o in outs)


def test_moreg_factor_for_hand_computed_values():
    mo = MoRegParams(window=(4, 26))
    cb = select_codebook(30)
    # relL1 = 0.2, rate_prev 2 -> 0.1; motion m = 0.5 -> m' = (0.5/0.385)^8 = 8.0923...;
    # g = 10 (m' - 1.0) / 2; factor = m' + |g|.
    sums = [0.2, 1.0, 0.5, 1.0]
    d, prev = decide(sums, 9, 2, cb, 1, mo, [1.0])
    mn = (0.5 / 0.385) ** 8
    assert mn == pytest.approx(8.09234, rel=1e-5)
    assert d.motion == [0.5] and d.motion_norm == [pytest.approx(mn)]
    assert d.grad == [pytest.approx(5 * (mn - 1))] and d.factor == [pytest.approx(mn + 5 * (mn - 1))]
    assert d.c == pytest.approx(0.1 * (mn + 5 * (mn - 1))) and d.rate == 1 and prev == [pytest.approx(mn)]
    # Below 0.385 the score shrinks fast; with m'_prev = m' the gradient vanishes.
    d2, _ = decide([0.2, 1.0, 0.3, 1.0], 10, 1, cb, 1, mo, [(0.3 / 0.385) ** 8])
    assert d2.factor == [pytest.approx((0.3 / 0.385) ** 8)] and d2.grad == [pytest.approx(0.0, abs=1e-12)]
    # Outside the window m' = 1 and the gradient is taken against m'_prev (the exit spike).
    d3, prev3 = decide([0.2, 1.0], 26, 3, cb, 1, mo, [0.5])
    assert d3.motion == [None] and d3.motion_norm == [1.0]
    assert d3.factor == [pytest.approx(1 + 10 * 0.5 / 3)] and prev3 == [1.0]
    # Without the gradient term: the factor is m'.
    nograd = MoRegParams(window=(4, 26), use_grad=False)
    d4, _ = decide(sums, 9, 2, cb, 1, nograd, [1.0])
    assert d4.factor == [pytest.approx(mn)]


def test_motion_sums_frame_differences_with_strides():
    # Frames of constant value 1, 2, 4: stride 1 -> (1 + 2) / ((2 + 4) + (1 + 2)) = 1/3;
    # stride 2 -> 3 / (4 + 1) = 0.6; the mean over strides is the motion score.
    r = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1).expand(2, 3, 5, 7)
    v = motion_sums(r, [1, 2]).tolist()
    n = 2 * 5 * 7
    assert v == pytest.approx([3 * n, 9 * n, 3 * n, 5 * n])
    d, _ = decide([1.0, 1.0] + v, 9, 1, select_codebook(30), 1, MoRegParams((4, 26), (1, 2)), [1.0])
    assert d.motion == [pytest.approx((1 / 3 + 0.6) / 2)]
    # A stride as long as the clip has no frame pairs: it contributes zeros and is skipped.
    assert motion_sums(r, [3]).tolist() == [0.0, 0.0]


def test_moreg_window_edges_in_a_run():
    every = dict(codebook_thresholds=[1.0], codebook_rates=[1, 1])  # every step computes
    pol, _, _ = drive(lambda s: 0.1, moreg=True, **every)
    with_motion = [d.step + 1 for d in pol.decisions if d.motion[0] is not None]
    assert with_motion == list(range(4, 27))  # 1-based 4..26 inclusive
    # Entering the window: the gradient is taken against m'_prev = 1.0 (from the steps before it).
    d4 = next(d for d in pol.decisions if d.step == 3)
    assert d4.grad[0] == pytest.approx(10 * (d4.motion_norm[0] - 1.0) / d4.rate_prev)
    pol100, _, _ = drive(lambda s: 0.1, n=100, moreg=True, **every)
    assert [d.step + 1 for d in pol100.decisions if d.motion[0] is not None] == list(range(10, 91))


def test_undefined_distance_falls_back_to_the_most_conservative_rate():
    d, _ = decide([0.0, 0.0], 5, 1, select_codebook(30), 1, None, [1.0])
    assert d.c == math.inf and d.rate == 1 and d.undefined


def test_steps_must_come_in_order_and_one_model_call_per_step():
    pol, model, _ = drive(lambda s: 0.0, n=5)  # a whole generation: the next call must be a step 0
    with pytest.raises(RuntimeError, match="step 3 follows step None"):
        pol.blocks(E(torch.zeros(1)), StepInfo(3, 5, 0.0))
    pol.blocks(E(torch.zeros(1)), StepInfo(0, 5, 0.0))
    with pytest.raises(RuntimeError, match="step 2 follows step 0"):
        pol.blocks(E(torch.zeros(1)), StepInfo(2, 5, 0.0))
    with pytest.raises(RuntimeError, match="step 0 follows step 0; the sampler must make one model call per step"):
        pol.blocks(E(torch.zeros(1)), StepInfo(0, 5, 0.0))


def test_install_uninstall_restores_the_model():
    model = ScriptedDiT(lambda s: 0.0)
    pol = AdaCache(cache_cfg(cache_loc=[1], cache_res="ca-mlp"))
    pol.install(model)
    assert pol.sites == ["spatial_blocks.1.cross_delta+spatial_blocks.1.mlp_delta",
                         "temporal_blocks.1.cross_delta+temporal_blocks.1.mlp_delta"]
    # only the metric sites' branches are shadowed (runner/cache/branches.py); the blocks stage is not
    assert "blocks" not in model.__dict__
    shadowed = {(k, i, a) for k in ("spatial", "temporal") for i, b in enumerate(getattr(model, f"{k}_blocks"))
                for a in b.__dict__ if a in ("attn", "attn_delta", "cross_attn", "cross_delta", "mlp", "mlp_delta")}
    assert shadowed == {(k, 1, a) for k in ("spatial", "temporal") for a in ("cross_attn", "cross_delta", "mlp",
                                                                              "mlp_delta")}
    pol.uninstall()
    assert all(not (set(b.__dict__) & {"attn", "attn_delta", "cross_attn", "cross_delta", "mlp", "mlp_delta"})
               for b in [*model.spatial_blocks, *model.temporal_blocks])
    with pytest.raises(ValueError, match="outside 0..1"):
        AdaCache(cache_cfg(cache_loc=[2])).install(model)


def test_each_config_builds_its_policy():
    assert isinstance(NoCacheConfig().build(), NoCache) and isinstance(AdaCacheConfig().build(), AdaCache)
    with pytest.raises(ValueError, match="cache_res"):
        AdaCacheConfig(cache_res="x").build()


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name,speed,moreg", [("adacache", "fast", False), ("adacache-slow", "slow", False),
                                              ("adacache-moreg", "fast", True)])
def test_named_configs(name, speed, moreg):
    cfg = make_cfg(f"cache={name}")
    assert type(cfg.cache) is AdaCacheConfig and cfg.cache.name == "adacache"
    assert (cfg.cache.speed, cfg.cache.moreg) == (speed, moreg)
    assert type(make_cfg().cache) is NoCacheConfig and make_cfg().cache.name == "none"


def test_config_overrides_and_validation():
    cfg = make_cfg("cache=adacache", "cache.codebook_thresholds=[0.1,0.2]", "cache.codebook_rates=[3,2,1]",
                   "cache.verify_agreement=true", "cache.cache_loc=[0,2]")
    assert cfg.cache.codebook_rates == [3, 2, 1] and cfg.cache.verify_agreement and cfg.cache.cache_loc == [0, 2]
    with pytest.raises(Exception, match="no_such_key"):
        make_cfg("cache=adacache", "cache.no_such_key=1")
    with pytest.raises(Exception, match="speed"):  # a field of another policy is not one of FBCache's
        make_cfg("cache=fbcache", "cache.speed=fast")
    for bad, msg in [("cache.cache_res=x-attn", "cache_res"), ("cache.speed=medium", "speed"),
                     ("cache.codebook_rates=[1,2]", "needs both"), ("cache.codebook_steps=50", "codebook_steps"),
                     ("cache.moreg_window=[5,2]", "moreg_window"), ("cache.moreg_strides=[0]", "strides")]:
        with pytest.raises(UserError, match=msg):
            validate(make_cfg("cache=adacache", "prompt=x", bad))
