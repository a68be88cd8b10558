"""TeaCache, First-Block-Cache, Delta-DiT and PAB under the DSP layout (gloo ranks).

Content-adaptive policies (TeaCache, FBCache): the reused-step pattern and every decision value are
the single-process ones for sp = 2, 3 and cfg = 2, and each decided step adds exactly one small
all-reduce (the rank agreement). Schedule policies (Delta-DiT, PAB): no agreement traffic at all.
Collectives per step under DSP sp = 2 are counted: a skipped spatial attention skips its two
all-to-alls, a reused stack skips every layout collective.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runner.cache import DeltaDiTConfig, FBCacheConfig, PABConfig, TeaCacheConfig
from tests.cache_util import FRAMES, SIZE, STEPS, inputs, run, sharded_run, tiny_model
from tests.dist_util import DistError, run_dist
from tests.helpers import PAB_TABLE

pytestmark = pytest.mark.usefixtures("one_thread")

DEPTH = 2
ADAPTIVE = {"teacache": TeaCacheConfig(speed="fast"),
            "fbcache": FBCacheConfig(fbcache_threshold=0.05)}


def _single(cache, ts=None):
    z, y, mask = inputs(frames=FRAMES, size=SIZE)
    model = tiny_model(depth=DEPTH)
    policy = cache.build()
    policy.install(model)
    return run(model, policy, z, y, mask, ts=ts), policy.report()


def _adaptive_expect(name, rep, step, sp, cfg_size):
    """The collectives one step must run: {op: count}."""
    expect = {}
    if cfg_size == 2:
        expect["all_gather"] = 1  # the velocity exchange inside the CFG pair
    decided = {d["step"] for d in rep["decisions"]}
    if step in decided:
        expect["all_reduce"] = 1
    if sp > 1:
        if rep["pattern"][step] == "C":
            expect["all_to_all"] = 2 * DEPTH
        elif name == "fbcache":
            expect["all_to_all"] = 2  # layer 0 runs on every step, with its spatial attention
    return expect


MESHES = [(2, 2, 1), (3, 3, 1), (2, 1, 2)]  # (world, sp, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@pytest.mark.parametrize("world,sp,cfg_size", MESHES, ids=[f"sp{m[1]}-cfg{m[2]}" for m in MESHES])
def test_adaptive_hit_pattern_invariance_and_collectives(name, world, sp, cfg_size):
    cache = ADAPTIVE[name]
    want, want_rep = _single(cache)
    assert 0 < want_rep["pattern"].count("R") < STEPS - 4
    decided = [d["step"] for d in want_rep["decisions"]]
    assert decided == (list(range(1, STEPS - 1)) if name == "teacache" else list(range(1, STEPS)))
    for full, rep, per_step in run_dist(sharded_run, world, sp, cfg_size, "dsp", cache, timeout=90):
        assert rep["pattern"] == want_rep["pattern"]
        assert [d["rel_l1"] for d in rep["decisions"]] == pytest.approx([d["rel_l1"] for d in want_rep["decisions"]],
                                                                         rel=1e-6)
        assert rep["agreement"]["size"] == world and rep["agreement"]["decision_all_reduces"] == len(decided)
        torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
        for step in range(STEPS):
            ops = {op: v["count"] for op, v in per_step[str(step)].items()}
            assert ops == _adaptive_expect(name, rep, step, sp, cfg_size), (step, rep["pattern"][step])
            if "all_reduce" in ops:
                assert per_step[str(step)]["all_reduce"]["bytes"] == 2 * 8  # two float64 sums


SCHEDULED = {
    "deltadit": DeltaDiTConfig(deltadit_interval=2, deltadit_span=2, deltadit_b=10),
    "deltadit-port": DeltaDiTConfig(deltadit_rule="port", deltadit_port_layers=[0, 0]),
    "pab246": PABConfig(pab_mlp_blocks=[0, 1]),
}
PAB_TS = [float(t) for t in PAB_TABLE]  # Open-Sora 480p 2 s timesteps: the PAB window and MLP keys apply


def _spatial_attentions_run(name, rep, step):
    """How many spatial self-attentions (2 all-to-alls each under DSP) ran at step."""
    if name.startswith("pab"):
        return DEPTH if rep["reuse_pattern"]["spatial"][step] == "C" else 0
    if rep["pattern"][step] == "C":
        return DEPTH
    lo, hi = rep["spans"][step]
    return DEPTH - len([i for i in range(lo, hi) if i % 2 == 0])  # spatial blocks sit at even positions


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_scheduled_policies_collectives_under_dsp_sp2(name):
    cache = SCHEDULED[name]
    ts = PAB_TS if name.startswith("pab") else None
    want, want_rep = _single(cache, ts)
    assert "R" in want_rep["pattern"]
    for full, rep, per_step in run_dist(sharded_run, 2, 2, 1, "dsp", cache, ts, timeout=90):
        assert rep["pattern"] == want_rep["pattern"]
        torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
        for step in range(STEPS):
            ops = {op: v["count"] for op, v in per_step[str(step)].items()}
            a2a = 2 * _spatial_attentions_run(name, rep, step)
            assert ops == ({"all_to_all": a2a} if a2a else {}), step  # and no agreement traffic
    if name == "deltadit":
        assert {tuple(s) for s in want_rep["spans"][:10]} == {(2, 4)} and {tuple(s) for s in want_rep["spans"][10:]} \
            == {(0, 2)}


def _perturbed(rank, world_size, cache):
    """rank 1 rescales TeaCache's distance differently: its decisions diverge from rank 0's."""
    from runner.cache import teacache

    if rank == 1:
        real = teacache.poly
        teacache.poly = lambda c, x: real(c, x) + 1.0
    return sharded_run(rank, world_size, 2, 1, "dsp", cache)


@pytest.mark.slow
def test_verify_agreement_turns_a_teacache_divergence_into_an_error():
    cache = dataclasses.replace(ADAPTIVE["teacache"], verify_agreement=True)
    ok = run_dist(sharded_run, 2, 2, 1, "dsp", cache, timeout=90)
    assert all(rep["agreement"]["verified"] for _, rep, _ in ok)
    with pytest.raises(DistError, match="TeaCache decisions diverged at step 1") as e:
        run_dist(_perturbed, 2, cache, timeout=90)
    assert "CacheAgreementError" in str(e.value) and "timed out" not in str(e.value)


@pytest.mark.slow
def test_pab_under_ulysses_skips_the_reused_attentions_all_to_alls():
    cache = SCHEDULED["pab246"]
    want, want_rep = _single(cache, PAB_TS)
    for full, rep, per_step in run_dist(sharded_run, 2, 2, 1, "ulysses", cache, PAB_TS, timeout=90):
        torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-4)
        pat = rep["reuse_pattern"]
        for step in range(STEPS):
            # per spatial block: q/k/v in + out around self-attention, q in + out around cross-attention
            a2a = 2 * DEPTH * ((pat["spatial"][step] == "C") + (pat["cross"][step] == "C"))
            ops = {op: v["count"] for op, v in per_step[str(step)].items()}
            assert ops == ({"all_to_all": a2a} if a2a else {}), step
        assert "R" in pat["cross"] and pat["cross"] != pat["spatial"]
