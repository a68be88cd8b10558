"""PAB: the broadcast schedule for Open-Sora 480p 2 s against the reference's step table, and on a
tiny STDiT3 that a reused module is not called and its stored post-gate output is what the block
adds, with the model untouched after uninstall."""

from __future__ import annotations

import pytest
import torch

from runner.cache import PAB, PABConfig
from runner.cache.pab import Schedule
from runner.sampler import SamplerSettings, make_timesteps
from tests.cache_util import inputs, run, timesteps, tiny_model
from tests.helpers import PAB_TABLE, make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = range(9, 26)  # steps whose timestep lies strictly inside (450, 930)


def _rows(ranges, ts=PAB_TABLE):
    s = Schedule(ranges, [450, 930], True, [676, 788, 864], 2)
    rows = {x: [] for x in ("spatial", "temporal", "cross", "mlp")}
    for k, t in enumerate(ts):
        reuse, _ = s.step(k, t)
        for x in rows:
            rows[x].append(reuse[x])
    return {x: [k for k, r in enumerate(v) if r] for x, v in rows.items()}


def test_the_table_is_our_sampler_for_480p_2s():
    ts = make_timesteps(SamplerSettings(num_steps=30), 480, 854, 51)
    assert [int(torch.tensor(t).to(torch.bfloat16).item()) for t in ts] == PAB_TABLE


@pytest.mark.parametrize("ranges", [(2, 4, 6), (3, 5, 7), (5, 7, 9)])
def test_reuse_pattern_480p_2s(ranges):
    rows = _rows(ranges)
    for kind, r in zip(("spatial", "temporal", "cross"), ranges):
        assert rows[kind] == [k for k in WINDOW if k % r != 0]
    assert rows["mlp"] == [14, 15, 18, 19, 22, 23]  # after the keys 864, 788, 676 at steps 13, 17, 21


def test_pab246_as_the_reference_states_it():
    rows = _rows((2, 4, 6))
    computed = {x: [k for k in WINDOW if k not in rows[x]] for x in ("spatial", "temporal", "cross")}
    assert computed == {"spatial": list(range(10, 26, 2)), "temporal": [12, 16, 20, 24], "cross": [12, 18, 24]}


def test_mlp_keys_exist_for_that_shape_only():
    assert _rows((2, 4, 6), timesteps(30))["mlp"] == []  # a linear schedule never hits 676/788/864
    # 720p 4 s meets one key by chance (788 at step 22): 2 reused steps instead of 6
    assert _rows((2, 4, 6), make_timesteps(SamplerSettings(num_steps=30), 720, 1280, 102))["mlp"] == [23, 24]


def test_named_configs():
    for name, ranges in (("pab246", [2, 4, 6]), ("pab357", [3, 5, 7]), ("pab579", [5, 7, 9])):
        c = make_cfg(f"cache={name}").cache
        assert (c.name, c.pab_ranges, c.pab_window, c.pab_mlp_keys) == ("pab", ranges, [450.0, 930.0],
                                                                        [676, 788, 864])
    with pytest.raises(ValueError, match="pab_ranges"):
        PAB(PABConfig(pab_ranges=[2, 0, 6]))
    p = PAB(PABConfig())
    p.install(tiny_model(depth=2))  # Open-Sora's MLP layers 0-4 on a 2-layer model: 0 and 1, the rest reported
    assert (p.mlp_layers, p.mlp_layers_absent) == ([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="pab_mlp_blocks"):
        PAB(PABConfig(pab_mlp_blocks=[-1])).install(tiny_model(depth=2))


CFG = PABConfig(pab_mlp_blocks=[1])


@torch.no_grad()
def test_reused_modules_are_not_called_and_add_their_stored_output():
    z, y, mask = inputs()
    model = tiny_model(depth=2)
    calls = {}  # (kind, layer, slot) -> steps it ran
    step = [None]
    for kind in ("spatial", "temporal"):
        for i, blk in enumerate(getattr(model, f"{kind}_blocks")):
            for slot, mod in (("self", blk.attn), ("cross", blk.cross_attn), ("mlp", blk.mlp)):
                mod.register_forward_pre_hook(
                    lambda m, a, key=(kind, i, slot): calls.setdefault(key, []).append(step[0]))
    policy = PAB(CFG)
    policy.install(model)
    added = {}  # (key, step) -> the branch the block added
    for kind in ("spatial", "temporal"):
        for i, blk in enumerate(getattr(model, f"{kind}_blocks")):
            for slot, tap in (("self", "attn_delta"), ("cross", "cross_delta"), ("mlp", "mlp_delta")):
                inner = blk.__dict__[tap]
                blk.__dict__[tap] = lambda x, inner=inner, key=(kind, i, slot): added.setdefault(
                    (key, step[0]), inner(x))
    stage = policy.blocks
    policy.blocks = lambda e, s: step.__setitem__(0, s.index) or stage(e, s)
    run(model, policy, z, y, mask, ts=[float(t) for t in PAB_TABLE])
    rep = policy.report()
    rows = _rows((2, 4, 6))
    assert rep["reuse_pattern"]["spatial"] == "".join("R" if k in rows["spatial"] else "C" for k in range(30))
    kinds = {("spatial", "self"): "spatial", ("temporal", "self"): "temporal"}
    for (bkind, i, slot), ran in calls.items():
        kind = "cross" if slot == "cross" else "mlp" if slot == "mlp" else kinds[(bkind, slot)]
        reused = rows[kind] if (slot != "mlp" or i == 1) else []
        assert ran == [k for k in range(30) if k not in reused], (bkind, i, slot)
        for k in reused:  # the very tensor stored at the module's last computed step
            last = max(j for j in ran if j < k)
            a, b = added[((bkind, i, slot), k)], added[((bkind, i, slot), last)]
            assert a.data_ptr() == b.data_ptr() and torch.equal(a, b)
    assert 0.5 < rep["computed_fraction"] < 1 and rep["bytes_held"] == 0 and rep["bytes_held_peak"] > 0
    policy.uninstall()
    assert "attn" not in model.spatial_blocks[0].__dict__ and "mlp_delta" not in model.temporal_blocks[1].__dict__


@torch.no_grad()
def test_outside_the_window_pab_is_exactly_no_cache():
    z, y, mask = inputs()
    plain = run(tiny_model(), None, z, y, mask)
    model = tiny_model()
    policy = PAB(PABConfig(pab_mlp_blocks=[0], pab_window=[0.0, 1.0]))
    policy.install(model)
    torch.testing.assert_close(run(model, policy, z, y, mask), plain, rtol=0, atol=0)
    assert policy.report()["pattern"] == "C" * 30 and policy.report()["computed_fraction"] == 1.0
    model2 = tiny_model()
    policy2 = PAB(CFG)
    policy2.install(model2)
    assert not torch.allclose(run(model2, policy2, z, y, mask, ts=[float(t) for t in PAB_TABLE]),
                              run(tiny_model(), None, z, y, mask, ts=[float(t) for t in PAB_TABLE]), atol=1e-4)
