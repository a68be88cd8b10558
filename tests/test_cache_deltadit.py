"""Delta-DiT: the budget formula, the stage-adaptive spans and refreshes, the PAB authors' port
schedule, and on a tiny STDiT3 that a cached step equals running the span when the span's blocks
are input-independent (x + c), with exactly the configured blocks skipped."""

from __future__ import annotations

import pytest
import torch

from runner.cache import DeltaDiT, DeltaDiTConfig
from runner.cache.base import block_sequence
from runner.cache.deltadit import budget, paper_plan, port_plan
from tests.cache_util import inputs, run, tiny_model
from tests.helpers import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_formula():
    assert budget(1.6, 28) == (2, 21)  # the paper's block-role setting: 28 + 7 block calls per 2 steps
    assert budget(1.12, 28) == (2, 6)  # the LCM claim
    assert budget(1.6, 56) == (2, 42)  # Open-Sora's 56 blocks
    assert budget(2.5, 56) == (3, 51)  # N = 3: ceil(3/2 * (56 - 22.4)) = ceil(50.4)
    assert budget(2.0, 56) == (2, 56)
    with pytest.raises(ValueError, match="> 1"):
        budget(1.0, 56)


def _pattern(plan):
    return "".join("C" if r else "R" for _, r in plan)


def test_paper_spans_rear_before_b_front_after_and_refresh_on_switch():
    plan = paper_plan(10, 8, interval=2, span=3, b=5, front_start=1)
    assert [s for s, _ in plan] == [(5, 8)] * 5 + [(1, 4)] * 5
    # k % 2 == 0 refreshes; k = 5 (odd) refreshes too: the span switched, the rear offset is invalid
    assert _pattern(plan) == "CRCRCCCRCR"
    assert _pattern(paper_plan(9, 8, 3, 3, b=4)) == "CRRCCRCRR"  # N = 3: switch at 4, then k % 3
    assert _pattern(paper_plan(6, 8, 1, 3, b=3)) == "CCCCCC"  # N = 1: no caching


def test_port_schedule_on_open_sora():
    plan = port_plan(30, steps=[0, 5], layers=[0, 5], gap=2)
    assert [k for k, (_, r) in enumerate(plan) if not r] == [1, 3, 5]
    assert {s for s, _ in plan} == {(0, 12)}  # ST-layers 0..5 = blocks 0..11
    assert [k for k, (_, r) in enumerate(port_plan(10, [2, 7], [1, 2], 3)) if not r] == [4, 7]


def test_named_configs():
    d = make_cfg("cache=deltadit").cache
    assert (d.name, d.deltadit_rule, d.deltadit_speedup, d.deltadit_span) == ("deltadit", "paper", 1.6, None)
    p = make_cfg("cache=deltadit-port").cache
    assert (p.deltadit_rule, p.deltadit_port_steps, p.deltadit_port_layers, p.deltadit_port_gap) == ("port", [0, 5],
                                                                                                   [0, 5], 2)
    port = DeltaDiT(p)
    port.install(tiny_model(depth=4))  # the port's layers 0..5 on a 4-layer model: 0..3 (all 8 blocks)
    assert (port.port_layers, port.span, port.interval) == ([0, 3], 8, 2)
    with pytest.raises(ValueError, match="deltadit_port_layers"):
        DeltaDiT(DeltaDiTConfig(deltadit_rule="port", deltadit_port_layers=[4, 5])).install(
            tiny_model(depth=4))
    with pytest.raises(ValueError, match="both"):
        DeltaDiT(DeltaDiTConfig(deltadit_span=3))
    with pytest.raises(ValueError, match="fit"):
        DeltaDiT(DeltaDiTConfig(deltadit_interval=2, deltadit_span=3, deltadit_front_start=6)).install(
            tiny_model(depth=4))


def _constant_blocks(model, idx):
    """Make blocks idx (in execution order) x -> x + c_i exactly (c_i random, input-independent)."""
    g = torch.Generator().manual_seed(5)
    seq = block_sequence(model)
    with torch.no_grad():
        for i in idx:
            blk = seq[i]
            for lin in (blk.attn.proj, blk.mlp.fc2, blk.cross_attn.proj):
                lin.weight.zero_()
                lin.bias.zero_()
            blk.cross_attn.proj.bias.copy_(torch.randn(blk.cross_attn.proj.bias.shape, generator=g) * 0.1)
    return model


CFG = dict(deltadit_interval=2, deltadit_span=3, deltadit_b=13, deltadit_front_start=1)


@torch.no_grad()
def test_offset_exactness_and_the_skipped_blocks():
    z, y, mask = inputs()
    spans = [1, 2, 3, 5, 6, 7]  # front (1, 4) and rear (5, 8) of a depth-4 model's 8 blocks
    want = run(_constant_blocks(tiny_model(depth=4), spans), None, z, y, mask)
    model = _constant_blocks(tiny_model(depth=4), spans)
    calls = []
    for i, blk in enumerate(block_sequence(model)):
        blk.register_forward_pre_hook(lambda m, a, i=i: calls[-1].add(i))
    policy = DeltaDiT(DeltaDiTConfig(**CFG))
    policy.install(model)
    stage = policy.blocks

    def counted(e, step):  # a new set of called blocks per step
        calls.append(set())
        return stage(e, step)

    policy.blocks = counted
    got = run(model, policy, z, y, mask)
    rep = policy.report()
    # the cached steps equal running the span: x + sum(c_i) either way
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rep["pattern"] == "CR" * 6 + "CCC" + "RC" * 7 + "R"  # k = 13 (odd) refreshes at the switch
    for k, ran in enumerate(calls):
        if rep["pattern"][k] == "C":
            assert ran == set(range(8))
        else:
            assert ran == ({0, 1, 2, 3, 4} if k < 13 else {0, 4, 5, 6, 7}), k  # rear (5..7), then front (1..3)
    assert rep["spans"][:13] == [[5, 8]] * 13 and rep["spans"][13:] == [[1, 4]] * 17
    assert rep["computed_fraction"] == pytest.approx((8 * 16 + 5 * 14) / (8 * 30))
    assert rep["bytes_held_peak"] == 2 * 4 * 16 * 64 * 4  # one fp32 (B=2, T=4, S=16, C=64) offset
    assert rep["bytes_held"] == 0  # freed after the last step


@torch.no_grad()
def test_the_ports_sign_and_a_real_span_change_the_result():
    z, y, mask = inputs()
    spans = [1, 2, 3, 5, 6, 7]
    want = run(_constant_blocks(tiny_model(depth=4), spans), None, z, y, mask)
    model = _constant_blocks(tiny_model(depth=4), spans)
    negated = DeltaDiT(DeltaDiTConfig(**CFG, deltadit_negate=True))
    negated.install(model)
    assert not torch.allclose(run(model, negated, z, y, mask), want, atol=1e-3)
    plain = run(tiny_model(depth=4), None, z, y, mask)
    model = tiny_model(depth=4)
    policy = DeltaDiT(DeltaDiTConfig(**CFG))
    policy.install(model)
    got = run(model, policy, z, y, mask)
    assert not torch.allclose(got, plain, atol=1e-4)  # real blocks: the offset is an approximation
    assert (got - plain).abs().max() < 0.5 * plain.abs().max()
