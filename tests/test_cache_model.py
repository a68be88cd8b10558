"""AdaCache on a tiny STDiT3: the single whole-stack residual equals a straightforward per-block
implementation (written here, as released: two cached increments per block), state is reset
between generations, and the runner reports the policy."""

from __future__ import annotations

import json

import pytest
import torch

from runner.cache import AdaCache, NoCache, forward
from runner.generate import generate
from runner.sampler import SamplerSettings, sample
from tests.cache_util import STEPS, cache_cfg, inputs, run, timesteps, tiny_model
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- the per-block reference (released form)


def released_rate(c, codebook: dict) -> int:
    """The released comparison chain: exactly 5 thresholds and a fallback; the last key is not compared."""
    k, v = list(codebook), list(codebook.values())
    if c < k[0]:
        return v[0]
    elif c < k[1]:
        return v[1]
    elif c < k[2]:
        return v[2]
    elif c < k[3]:
        return v[3]
    elif c < k[4]:
        return v[4]
    return v[5]


class PerBlockAdaCache:
    """112-style caching: every block keeps its self-attention increment and its CA+MLP increment;
    a reused step adds them block by block. Metric and MoReg on the full (unsharded) tensor."""

    def __init__(self, model, n, codebook, res="t-attn", loc=(0,), moreg=None):
        self.model, self.n, self.codebook, self.res, self.loc, self.moreg = model, n, codebook, res, loc, moreg
        self.rate, self.last, self.cache, self.prev_metric, self.mprev = 1, 0, {}, {}, {}
        self.computed = []
        self.cap = {}
        for kind in ("spatial", "temporal"):
            for i, blk in enumerate(getattr(model, f"{kind}_blocks")):
                for tap in ("attn_delta", "cross_delta", "mlp_delta"):
                    getattr(blk, tap).register_forward_hook(self._hook((kind, i, tap)))

    def _hook(self, key):
        def hook(mod, inp, out):
            self.cap[key] = out
        return hook

    def metric_residuals(self, kind, i, a, m):
        if i not in self.loc:
            return None
        if self.res == "t-attn":
            return a if kind == "temporal" else None
        if self.res == "s-attn":
            return a if kind == "spatial" else None
        return m  # ca-mlp: both the spatial and the temporal block

    def motion_factor(self, r, s, rate, key):
        window, strides = self.moreg
        if window[0] <= s <= window[1]:
            ms = []
            for i in strides:
                a, b = r[:, i:], r[:, :-i]
                ms.append(((a - b).abs().sum() / (a.abs().sum() + b.abs().sum())).item())
            mn = ((sum(ms) / len(ms)) / 0.385) ** 8 / 1
        else:
            mn = 1.0
        g = 10 * (mn - self.mprev.get(key, 1.0)) / rate
        self.mprev[key] = mn
        return mn + abs(g)

    def blocks(self, e, s):
        compute = s == self.last + self.rate or s in (1, self.n - 1, self.n)
        rate_now, x, cs = self.rate, e.x, []
        for i, (sb, tb) in enumerate(zip(self.model.spatial_blocks, self.model.temporal_blocks)):
            for kind, blk in (("spatial", sb), ("temporal", tb)):
                key = (kind, i)
                if compute:
                    x = blk(x, e.y, e.y_mask, e.t_mlp)
                    a = self.cap[(kind, i, "attn_delta")]
                    m = self.cap[(kind, i, "cross_delta")] + self.cap[(kind, i, "mlp_delta")]
                    r = self.metric_residuals(kind, i, a, m)
                    if r is not None:
                        if key in self.prev_metric:
                            p = self.prev_metric[key]
                            c = ((p - r).abs().sum() / p.abs().sum()).item() / rate_now
                            if self.moreg:
                                c *= self.motion_factor(r, s, rate_now, key)
                            cs.append(c)
                        self.prev_metric[key] = r
                    self.cache[key] = (a, m)
                else:
                    x = x + self.cache[key][0]
                    x = x + self.cache[key][1]
        if compute:
            self.computed.append(s - 1)
            self.last = s
            if cs:
                self.rate = released_rate(sum(cs) / len(cs), self.codebook)
        return x


@torch.no_grad()
def run_reference(model, ref, z, y, mask, n=STEPS):
    def model_fn(z_in, t_in, info):
        e = model.embed(z_in, t_in, y, mask)
        return model.final(ref.blocks(e, info.index + 1), e)

    return sample(model_fn, z, SamplerSettings(num_steps=n, use_timestep_transform=False), timesteps(n), 4)


FAST30 = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
VARIED = {0.03: 5, 0.05: 4, 0.06: 3, 0.07: 2, 0.09: 1, 1.00: 1}  # thresholds in this model's range


def as_cfg(codebook):
    k, v = list(codebook), list(codebook.values())
    return dict(codebook_thresholds=k[:-1], codebook_rates=v)


CASES = {
    "fast": (FAST30, {}, dict(res="t-attn", loc=(0,))),
    "varied": (VARIED, {}, dict(res="t-attn", loc=(0,))),
    "moreg": (FAST30, dict(moreg=True), dict(res="t-attn", loc=(0,), moreg=((4, 26), (1,)))),
    "moreg-strides": (VARIED, dict(moreg=True, moreg_strides=[1, 2]), dict(res="t-attn", loc=(0,), moreg=((4, 26), (1, 2)))),
    "ca-mlp-2-layers": (VARIED, dict(cache_res="ca-mlp", cache_loc=[0, 1]), dict(res="ca-mlp", loc=(0, 1))),
    "s-attn": (VARIED, dict(cache_res="s-attn", cache_loc=[1]), dict(res="s-attn", loc=(1,))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_stack_residual_equals_per_block_caches(case):
    codebook, kw, ref_kw = CASES[case]
    z, y, mask = inputs()
    model = tiny_model()
    ref = PerBlockAdaCache(model, STEPS, codebook, **ref_kw)
    want = run_reference(model, ref, z, y, mask)

    model2 = tiny_model()  # fresh model: the reference's hooks stay on the other one
    pol = AdaCache(cache_cfg(**as_cfg(codebook), **kw))
    pol.install(model2)
    got = run(model2, pol, z, y, mask)
    rep = pol.report()
    assert rep["computed_steps"] == ref.computed
    assert 4 <= rep["num_computed"] < STEPS  # the schedule really reuses
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The uncached result is clearly different: the comparison above is not vacuous.
    assert (run(tiny_model(), None, z, y, mask) - got).abs().max() > 1e-3


def test_published_fast_codebook_path_and_memory_held():
    z, y, mask = inputs()
    model = tiny_model()
    pol = AdaCache(cache_cfg())
    pol.install(model)
    run(model, pol, z, y, mask)
    rep = pol.report()
    assert rep["codebook"]["source"] == "published 30-step fast" and rep["codebook"]["exact"]
    assert rep["sites"] == ["temporal_blocks.0.attn_delta"]
    b, t, s, c = 2, 4, 16, 64  # both CFG halves, 4 frames, 4x4 patches, hidden 64
    assert rep["bytes_held_peak"] == b * t * s * c * 4 * 2  # fp32 whole-stack residual + fp32 metric residual
    assert rep["bytes_held"] == 0  # freed after the last step
    assert rep["agreement"]["decision_all_reduces"] == len(rep["decisions"]) == rep["num_computed"] - 2
    json.dumps(rep, allow_nan=False)


def test_all_computed_is_bit_identical_to_no_cache_and_nocache_is_transparent():
    z, y, mask = inputs()
    plain = run(tiny_model(), None, z, y, mask)
    model = tiny_model()
    pol = AdaCache(cache_cfg(codebook_thresholds=[1.0], codebook_rates=[1, 1]))
    pol.install(model)
    assert torch.equal(run(model, pol, z, y, mask), plain)
    assert pol.report()["pattern"] == "C" * STEPS
    nc = NoCache()
    nc.install(model := tiny_model())
    assert torch.equal(run(model, nc, z, y, mask), plain) and nc.report()["num_computed"] == STEPS


def test_state_is_reset_between_generations():
    za, y, mask = inputs(seed=1)
    zb, _, _ = inputs(seed=2)
    fresh = tiny_model()
    pol_fresh = AdaCache(cache_cfg(moreg=True))
    pol_fresh.install(fresh)
    want = run(fresh, pol_fresh, zb, y, mask)
    want_rep = pol_fresh.report()

    model = tiny_model()
    pol = AdaCache(cache_cfg(moreg=True))
    pol.install(model)
    run(model, pol, za, y, mask)
    assert torch.equal(run(model, pol, zb, y, mask), want)
    assert pol.report() == want_rep
    # An aborted generation leaves state behind; the next one (step 0 starts afresh) is unaffected.
    with pytest.raises(KeyboardInterrupt):
        def abort(i, phase):
            if i == 12:
                raise KeyboardInterrupt
        def fn(z_in, t_in, step):
            return forward(model, pol, step, z_in, t_in, y, mask)
        with torch.no_grad():
            sample(fn, za, SamplerSettings(num_steps=STEPS, use_timestep_transform=False), timesteps(), 4, on_step=abort)
    assert torch.equal(run(model, pol, zb, y, mask), want)
    assert pol.report() == want_rep


def test_generate_reports_the_cache(tmp_path):
    (rep,) = generate(make_cfg("prompt=a red circle moves left", f"output_dir={tmp_path}", "num_frames=4",
                               "height=16", "width=16", "sampler.num_steps=6", "progress=false", "cache=adacache-moreg"))
    saved = json.loads(open(rep["output"][:-4] + ".json").read())
    assert saved["cache"]["policy"] == "adacache" and len(saved["cache"]["pattern"]) == 6
    assert saved["cache"]["moreg"]["window"] == [1, 5]  # (4, 26) of 30 steps scaled to 6 steps
    assert saved["config"]["cache"]["name"] == "adacache"
    (rep2,) = generate(make_cfg("prompt=x", f"output_dir={tmp_path / 'b'}", "num_frames=4", "height=16",
                                "width=16", "sampler.num_steps=3", "progress=false"))
    assert rep2["cache"]["policy"] == "none" and rep2["cache"]["pattern"] == "CCC"
