import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.flops import stdit3_flops
from models.layers import PositionEmbedding2D, RotaryEmbedding
from models.stdit3 import build_stdit3, get_config


def published_layout():
    """Key -> shape of hpcai-tech/OpenSora-STDiT-v3, written out from the published layout."""
    c, out = 1152, 32
    lin = lambda o, i: {"weight": (o, i), "bias": (o,)}  # noqa: E731
    keys = {"x_embedder.proj.weight": (c, 4, 1, 2, 2), "x_embedder.proj.bias": (c,), "rope.freqs": (36,)}
    for emb in ("t_embedder", "fps_embedder"):
        for k, v in lin(c, 256).items():
            keys[f"{emb}.mlp.0.{k}"] = v
        for k, v in lin(c, c).items():
            keys[f"{emb}.mlp.2.{k}"] = v
    keys.update({f"t_block.1.{k}": v for k, v in lin(6 * c, c).items()})
    keys.update({f"y_embedder.y_proj.fc1.{k}": v for k, v in lin(c, 4096).items()})
    keys.update({f"y_embedder.y_proj.fc2.{k}": v for k, v in lin(c, c).items()})
    keys["y_embedder.y_embedding"] = (300, 4096)
    keys["final_layer.scale_shift_table"] = (2, c)
    keys.update({f"final_layer.linear.{k}": v for k, v in lin(out, c).items()})
    for kind in ("spatial", "temporal"):
        for i in range(28):
            p = f"{kind}_blocks.{i}."
            keys[p + "scale_shift_table"] = (6, c)
            parts = {
                "attn.qkv": (3 * c, c), "attn.proj": (c, c), "cross_attn.q_linear": (c, c),
                "cross_attn.kv_linear": (2 * c, c), "cross_attn.proj": (c, c),
                "mlp.fc1": (4 * c, c), "mlp.fc2": (c, 4 * c),
            }
            for name, (o, i_) in parts.items():
                keys[f"{p}{name}.weight"] = (o, i_)
                keys[f"{p}{name}.bias"] = (o,)
            keys[p + "attn.q_norm.weight"] = (72,)
            keys[p + "attn.k_norm.weight"] = (72,)
    return keys


def test_xl2_matches_published_layout():
    model = build_stdit3(get_config("STDiT3-XL/2"), device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_layout()
    assert sum(math.prod(s) for s in got.values()) == 1_208_872_772


@pytest.mark.parametrize("size", [(3, 5, 7), (1, 4, 6), (5, 9, 3)])
def test_forward_shape_odd_sizes(size):
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=0)
    x = torch.randn(2, 4, *size)
    out = model(x, torch.tensor([500.0, 500.0]), torch.randn(2, 1, 16, 32), torch.ones(1, 16))
    assert out.shape == (2, 8, *size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_padding_crop_keeps_tokens_independent_of_padding_content():
    # The padded row/column is zeros; the kept region must not depend on how much is cropped later.
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=1)
    x = torch.randn(1, 4, 2, 5, 7)
    xp = torch.nn.functional.pad(x, (0, 1, 0, 1))  # what the patch embedder does internally
    y, m = torch.randn(1, 16, 32), torch.ones(1, 16)
    a = model(x, torch.tensor([300.0]), y, m, height=5, width=7)
    b = model(xp, torch.tensor([300.0]), y, m, height=5, width=7)[..., :5, :7]
    torch.testing.assert_close(a, b)


def test_position_embedding_column_first_and_scaled():
    pe = PositionEmbedding2D(16)
    e = pe(2, 3, scale=1.0, base_size=3)  # grid 2 rows x 3 cols
    # row 0: first half varies with the column, second half (row coordinate) is constant.
    assert not torch.allclose(e[0, :8], e[1, :8])
    torch.testing.assert_close(e[0, 8:], e[2, 8:])
    # token 3 = row 1, col 0: row coordinate 1 * base/hp = 1.5 -> sin(1.5 * f0) in channel 8
    torch.testing.assert_close(e[3, 8], torch.sin(torch.tensor(1.5)))
    torch.testing.assert_close(e[3, :8], e[0, :8])
    # rows= slice equals the corresponding rows of the full grid
    torch.testing.assert_close(pe(2, 3, 1.0, 3, rows=(1, 2)), e[3:])


def test_rope_interleaved_pairs():
    rope = RotaryEmbedding(4)
    x = torch.randn(1, 1, 3, 4)
    out = rope(x)
    f = rope.freqs
    for n in range(3):
        for j in range(2):
            a = n * f[j]
            x0, x1 = x[0, 0, n, 2 * j], x[0, 0, n, 2 * j + 1]
            torch.testing.assert_close(out[0, 0, n, 2 * j], x0 * torch.cos(a) - x1 * torch.sin(a))
            torch.testing.assert_close(out[0, 0, n, 2 * j + 1], x1 * torch.cos(a) + x0 * torch.sin(a))


def test_cross_attention_ignores_padding_tokens_and_null_mask_reuse():
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=2)
    x = torch.randn(2, 4, 2, 4, 4)
    y = torch.randn(2, 16, 32)
    mask = torch.zeros(1, 16)
    mask[0, :5] = 1  # one mask for the CFG pair: the null half reuses the cond mask
    t = torch.tensor([400.0, 400.0])
    a = model(x, t, y, mask)
    y2 = y.clone()
    y2[:, 5:] = torch.randn(2, 11, 32) * 10  # padding content must not matter
    torch.testing.assert_close(a, model(x, t, y2, mask))
    torch.testing.assert_close(a, model(x, t, y[:, :5], mask[:, :5]))  # trimming is exact
    # per-sample lengths: a sample's output depends only on its own text
    mask2 = torch.tensor([[1.0] * 5 + [0] * 11, [1.0] * 9 + [0] * 7])
    b = model(x, t, y, mask2)
    torch.testing.assert_close(b[:1], a[:1])
    assert not torch.allclose(b[1:], a[1:])


def test_timestep_is_cast_to_model_dtype():
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=0, dtype=torch.bfloat16)
    x, y, m = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 16, 32), torch.ones(1, 16)
    # bf16 has a spacing of 4 between 512 and 1024: 996.6 and 996 are the same timestep.
    torch.testing.assert_close(model(x, torch.tensor([996.6]), y, m), model(x, torch.tensor([996.0]), y, m))


@pytest.mark.parametrize("size,text", [((3, 5, 9), 7), ((2, 4, 4), 16)])
def test_flop_formula_matches_flop_counter(size, text):
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=0)
    x = torch.randn(2, 4, *size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, torch.tensor([500.0, 500.0]), torch.randn(2, text, 32), torch.ones(2, text))
    assert stdit3_flops(cfg, 2, *size, text).total == fc.get_total_flops()


def test_row_band_embedding_uses_global_coordinates():
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=4)
    x = torch.randn(1, 4, 2, 9, 6)  # 5 patch rows (last one padded), 3 patch columns
    y, m, t = torch.randn(1, 16, 32), torch.ones(1, 16), torch.tensor([250.0])
    full = model.embed(x, t, y, m, height=72, width=48)
    band = model.embed(x[:, :, :, 4:9], t, y, m, height=72, width=48, rows=(2, 5))  # patch rows 2..4
    torch.testing.assert_close(band.x, full.x[:, :, 2 * 3:, :])
    assert band.grid == full.grid == (2, 5, 3)
    # the final layer of a band returns that band's latent rows, cropped like the full output
    out_full = model.final(full.x, full)
    torch.testing.assert_close(model.final(band.x, band), out_full[:, :, :, 4:9])


def test_residual_taps_see_the_increments():
    cfg = get_config("STDiT3-tiny")
    model = build_stdit3(cfg, seed=5)
    seen = {}
    blk = model.temporal_blocks[1]
    for name in ("attn_delta", "cross_delta", "mlp_delta"):
        getattr(blk, name).register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, out))
    inputs = {}
    blk.register_forward_hook(lambda mod, inp, out: inputs.update(x=inp[0], out=out))
    model(torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 16, 32), torch.ones(1, 16))
    torch.testing.assert_close(inputs["out"] - inputs["x"], seen["attn_delta"] + seen["cross_delta"] + seen["mlp_delta"])


def test_temporal_pos_embed_is_off_for_opensora_and_adds_no_keys():
    assert get_config("STDiT3-XL/2").temporal_pos_embed is False
    cfg = get_config("STDiT3-tiny")
    on = build_stdit3(get_config("STDiT3-tiny", temporal_pos_embed=True), seed=0)
    off = build_stdit3(cfg, seed=0)
    assert on.state_dict().keys() == off.state_dict().keys()  # parameter-free: same checkpoints load


def test_only_the_temporal_pos_embed_tells_identical_frames_apart():
    # Why a pixel-space model may need it: with RoPE alone, frames that are equal stay equal through every
    # block (attention over identical keys returns the same value), so from i.i.d. noise the model
    # cannot make early and late frames differ systematically.
    x = torch.randn(1, 4, 1, 6, 6).expand(1, 4, 5, 6, 6).contiguous()  # 5 identical frames
    args = (torch.tensor([900.0]), torch.randn(1, 16, 32), torch.ones(1, 16))
    for flag in (False, True):
        model = build_stdit3(get_config("STDiT3-tiny", temporal_pos_embed=flag), seed=2)
        with torch.no_grad():
            for blk in model.temporal_blocks:  # undo the identity init so temporal attention acts
                for lin in (blk.attn.proj, blk.mlp.fc2):
                    lin.weight.normal_(0, 0.05)
            out = model(x, *args)
        spread = (out - out[:, :, :1]).abs().max().item()
        assert (spread > 1e-3) if flag else (spread < 1e-5), (flag, spread)
