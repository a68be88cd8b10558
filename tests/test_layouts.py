"""Sequence-parallel layouts: row-band geometry, the collectives each layout issues (counted in a
dry run for every rank of every p), and on real gloo ranks the sharded forward against the
single-device one, including shards that are empty in time (T < p)."""

import pytest
import torch

from dist_util import run_dist
from models.stdit3 import build_stdit3, get_config
from parallel.comm import Comm, split_sizes
from parallel.dry import dry_comm
from parallel.layouts import parallelize
from parallel.mesh import Mesh, ParallelConfig, init_mesh
from parallel.shard import RowShard, row_shard

TINY = get_config("STDiT3-tiny")  # depth 2, hidden 64, 4 heads, patch (1, 2, 2), 4 -> 8 channels
SIZE = (5, 9, 10)  # latent T, H, W: 5 frames, 5 patch rows (the last one half), 5 patch columns


def _inputs(batch=2, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, *size, generator=g)
    y = torch.randn(batch, 7, TINY.caption_channels, generator=g)
    mask = torch.ones(batch // 2 if batch > 1 else 1, 7)
    mask[:, 5:] = 0  # padding text tokens
    return z, torch.full((batch,), 700.0), y, mask


# ----------------------------------------------------------------------------- geometry


def test_row_shard_bands_cover_the_latent_in_whole_patch_rows():
    s = [RowShard(5, 9, 10, (1, 2, 2), 3, r) for r in range(3)]
    assert s[0].patch_rows == 5 and s[0].patch_cols == 5 and s[0].row_sizes == [2, 2, 1]
    assert [x.latent_range() for x in s] == [(0, 4), (4, 8), (8, 9)]  # the last band ends in half a patch row
    assert [x.rows for x in s] == [(0, 5), (2, 5), (4, 5)]
    assert s[0].latent_row_sizes == [4, 4, 1] and s[0].token_sizes == [10, 10, 5]
    assert s[0].frame_sizes == [2, 2, 1]
    z = torch.arange(9 * 10.0).reshape(1, 1, 1, 9, 10)
    assert torch.equal(torch.cat([x.slice(z) for x in s], dim=-2), z)


@pytest.mark.parametrize("h,ph,p", [(9, 2, 4), (90, 2, 8), (45, 1, 7), (16, 4, 4)])
def test_row_shard_sizes(h, ph, p):
    bands = [row_shard((2, 4, 3, h, 7), (1, ph, 2), p, r) for r in range(p)]
    ranges = [b.latent_range() for b in bands]
    assert ranges[0][0] == 0 and ranges[-1][1] == h
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(r[0] % ph == 0 for r in ranges)  # whole patch rows
    assert max(bands[0].row_sizes) - min(bands[0].row_sizes) <= 1


def test_row_shard_needs_a_patch_row_per_rank():
    with pytest.raises(ValueError, match=r"3 patch rows .* use parallel.sp <= 3"):
        RowShard(4, 6, 8, (1, 2, 2), 4, 0)


# ----------------------------------------------------------------------------- installing


def test_parallelize_checks_and_keeps_the_state_dict():
    model = build_stdit3(TINY, seed=0)
    keys = list(model.state_dict())
    comm = dry_comm(0, sp=3)
    with pytest.raises(ValueError, match=r"4 attention heads over parallel.sp=3.*heads % sp == 0.*\[1, 2, 4\]"):
        parallelize(model, comm.mesh, comm, "ulysses")
    with pytest.raises(ValueError, match="unknown sequence-parallel layout 'ring'"):
        parallelize(model, comm.mesh, comm, "ring")
    sp = parallelize(model, comm.mesh, comm, "dsp")
    assert sp.num_hooked == TINY.depth and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="already has a sequence-parallel layout"):
        parallelize(model, comm.mesh, comm, "dsp")
    z, t, y, mask = _inputs()
    with pytest.raises(RuntimeError, match="no latent geometry bound"):
        model(z, t, y, mask)
    sp.shard(z.shape)
    with pytest.raises(RuntimeError, match=r"got \(5, 25\), the bound geometry expects \(5, 10\)"):
        model(z, t, y, mask)  # the whole latent instead of the band
    sp.remove()
    ref = build_stdit3(TINY, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(z, t, y, mask), ref(z, t, y, mask), rtol=0, atol=0)
    assert comm.log.events == []


def test_sp_of_one_installs_nothing():
    model = build_stdit3(TINY, seed=0)
    comm = Comm(Mesh.layout(0, 1, 1, 1, 1))
    sp = parallelize(model, comm.mesh, comm, "ulysses")
    assert sp.num_hooked == 0 and sp.shard((1, 4, *SIZE)).rows == (0, 5)


# ----------------------------------------------------------------------------- counted collectives


def _dry_step(layout, p, r, batch=2, size=SIZE):
    """One forward of rank r of p in a dry run; -> (this rank's step log, geometry)."""
    model = build_stdit3(TINY, seed=0)
    comm = dry_comm(r, sp=p)
    sp = parallelize(model, comm.mesh, comm, layout)
    z, t, y, mask = _inputs(batch, size)
    shard = sp.shard(z.shape)
    comm.log.set_step(0)
    with torch.no_grad():
        out = model(shard.slice(z), t, y, mask, rows=shard.rows)
    a, b = shard.latent_range()
    assert out.shape == (batch, TINY.out_channels, size[0], b - a, size[2])
    per_pair = ["dsp.to_time", "dsp.to_space"] if layout == "dsp" else [
        "ulysses.qkv", "ulysses.attn_out", "ulysses.cross_q", "ulysses.cross_out"]  # Open-Sora 1.2's set
    assert [e.tag for e in comm.log.events] == per_pair * TINY.depth
    return comm.log.per_step()[0], shard


def _formula(layout, shard, r, batch):
    """Expected all_to_all count and bytes per step for rank r: E_r = B*T*S_r*C*4 (fp32)."""
    c, depth, p = TINY.hidden_size, TINY.depth, shard.parts
    t, s = shard.frame_tokens, sum(shard.token_sizes)
    e_r = batch * t * shard.token_sizes[r] * c * 4  # this rank's S-shard of the hidden state
    if layout == "dsp":  # S->T switch sends the S-shard, T->S sends the T-shard
        return 2 * depth, depth * (e_r + batch * shard.frame_sizes[r] * s * c * 4)
    e = batch * t * s * c * 4  # Ulysses: qkv 3E_r, q 1E_r, two outputs of E/p each
    return 4 * depth, depth * (3 * e_r + e_r + 2 * e // p)


@pytest.mark.parametrize("layout,p", [("dsp", 2), ("dsp", 3), ("dsp", 4), ("ulysses", 2), ("ulysses", 4)])
def test_collectives_per_step_match_the_formula(layout, p):
    batch = 2
    total = 0
    for r in range(p):
        step, shard = _dry_step(layout, p, r, batch)
        assert set(step) == {"all_to_all"}  # nothing else inside the loop
        count, nbytes = _formula(layout, shard, r, batch)
        assert step["all_to_all"]["count"] == count and step["all_to_all"]["bytes"] == nbytes
        total += nbytes
    e = batch * SIZE[0] * 25 * TINY.hidden_size * 4
    assert total == TINY.depth * (2 if layout == "dsp" else 6) * e  # 2E/p resp. 6E/p per rank on average


# ----------------------------------------------------------------------------- real ranks


def _sharded_forward(rank, world, layout, size, config=TINY):
    mesh = init_mesh(ParallelConfig(sp=world, timeout_s=30))
    comm = Comm(mesh)
    model = build_stdit3(config, seed=0)
    z, t, y, mask = _inputs(2, size)
    with torch.no_grad():
        hw = dict(height=size[1], width=size[2])  # the whole video's size: a band's own would change the scale
        ref = model(z, t, y, mask, **hw)
        sp = parallelize(model, mesh, comm, layout)
        shard = sp.shard(z.shape)
        band = model(shard.slice(z), t, y, mask, rows=shard.rows, **hw)
        full = shard.assemble(band, comm)
    diff = (full - ref).abs().max().item() / ref.abs().max().item()
    return diff, shard.frame_sizes, [(e.op, e.tag) for e in comm.log.events]


@pytest.mark.slow
def test_sharded_forward_equals_single_device_on_3_ranks():
    for size in (SIZE, (2, 9, 10)):  # T=2 < p=3: one rank holds no frames during spatial attention
        res = run_dist(_sharded_forward, 3, "dsp", size)
        for diff, frame_sizes, ops in res:
            assert diff <= 1e-5, diff
            assert frame_sizes == split_sizes(size[0], 3)
            assert ops == [("all_to_all", "dsp.to_time"), ("all_to_all", "dsp.to_space")] * TINY.depth + [
                ("all_gather", "assemble")]


@pytest.mark.parametrize("layout", ["dsp", "ulysses"])
def test_sharded_forward_with_temporal_pos_embed_on_2_ranks(layout):
    # The demo model's frame-index embedding is added to every rank's row band: frames are never split
    config = get_config("STDiT3-tiny", temporal_pos_embed=True)
    for diff, _, _ in run_dist(_sharded_forward, 2, layout, SIZE, config):
        assert diff <= 1e-5, diff


def test_bench_dry_run_counts_stdit3_xl_at_720p():
    """bench/comm_bytes.py's dry run: rank 0 of 8 at 720p 4s (B=2, bf16) holds 6 of the 45 patch rows
    (480 of 3600 tokens per frame) and, for spatial attention, 4 of the 30 frames."""
    from bench.comm_bytes import LATENT, one_step

    xl = get_config("STDiT3-XL/2")
    model = build_stdit3(xl, device="meta", dtype=torch.bfloat16)
    token = 2 * xl.hidden_size * 2  # one token of the CFG pair in bf16
    e_s, e_t = 30 * 480 * token, 4 * 3600 * token  # the S-shard sent to time-sharding, the T-shard sent back
    kept = 4 * 480 * token  # both ways, the chunk that stays on rank 0: its 4 frames x its 480 tokens
    assert LATENT == (4, 30, 90, 160)
    assert one_step(model, "dsp", 8, 0)["all_to_all"] == {
        "count": 56, "bytes": 28 * (e_s + e_t), "bytes_remote": 28 * (e_s + e_t - 2 * kept),
        "bytes_in": 28 * (e_t + e_s - 2 * kept)}
