"""Building on the meta device: shapes only, no arithmetic (which would import torch._dynamo, about
1 s of start-up), and the CPU build's initial values bit-identical to the expressions they replaced."""

import os
import subprocess
import sys

import torch
from torch import nn

from models.layers import (CaptionEmbedder, CrossAttention, FinalLayer, Mlp, PositionEmbedding2D, RotaryEmbedding,
                           SelfAttention, STDiT3Block)
from models.stdit3 import STDiT3Config, build_stdit3
from models.text_tiny import TinyTextConfig, TinyTextEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = STDiT3Config(depth=2, hidden_size=96, num_heads=4, caption_channels=64, model_max_length=16,
                   in_channels=3, pred_sigma=False)


def test_cpu_initial_values_are_the_old_expressions():
    # Each oracle replays the old constructor: same RNG draws in the same order, then the literal
    # expression that `initial_value` now wraps.
    dim, heads, half = 96, 4, 48
    assert torch.equal(PositionEmbedding2D(dim).inv_freq, 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half)))
    for d in (24, 7):
        want = 1.0 / (10000.0 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
        assert torch.equal(RotaryEmbedding(d).freqs.data, want)

    torch.manual_seed(1)
    got = CaptionEmbedder(64, dim, 16).y_embedding
    torch.manual_seed(1)
    Mlp(64, dim, dim)
    assert torch.equal(got, torch.randn(16, 64) / 64**0.5)

    torch.manual_seed(2)
    got = STDiT3Block(dim, heads, 4.0, "spatial", qk_norm=True).scale_shift_table.data
    torch.manual_seed(2)
    SelfAttention(dim, heads, "spatial", qk_norm=True), CrossAttention(dim, heads), Mlp(dim, 4 * dim, dim)
    assert torch.equal(got, torch.randn(6, dim) / dim**0.5)

    torch.manual_seed(3)
    got = FinalLayer(dim, 16, 3).scale_shift_table.data
    torch.manual_seed(3)
    nn.Linear(dim, 16 * 3)
    assert torch.equal(got, torch.randn(2, dim) / dim**0.5)

    torch.manual_seed(4)
    enc = TinyTextEncoder(TinyTextConfig(), vocab_size=50)
    torch.manual_seed(4)
    tok = nn.Embedding(50, 64)
    assert torch.equal(enc.tok_embed.weight.data, tok.weight.data)
    assert torch.equal(enc.pos_embed.data, torch.randn(16, 64) * 0.02)
    # and the draws after them (the transformer layers) are where they were
    torch.manual_seed(4)
    nn.Embedding(50, 64), torch.randn(16, 64)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True)
    assert torch.equal(enc.layers.layers[0].linear1.weight.data, layer.linear1.weight.data)


def test_meta_build_has_the_cpu_build_shapes_and_draws_nothing():
    cpu = build_stdit3(CFG, device="cpu", seed=None)
    torch.manual_seed(5)
    meta = build_stdit3(CFG, device="meta", dtype=torch.bfloat16)
    after = torch.randn(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.randn(4))  # the CPU generator is untouched
    want = {n: t.shape for n, t in [*cpu.named_parameters(), *cpu.named_buffers()]}
    got = {n: t.shape for n, t in [*meta.named_parameters(), *meta.named_buffers()]}
    assert got == want
    assert all(t.is_meta and t.dtype == torch.bfloat16 for t in [*meta.parameters(), *meta.buffers()])


def test_loading_the_shipped_demo_does_not_import_dynamo():
    # A fresh process: the pipeline builder on meta plus the shipped checkpoint, as `runner.generate` does.
    code = (
        "import sys, torch\n"
        "from runner.families import build_pipeline\n"
        "from tests.helpers import make_cfg\n"
        "pipe = build_pipeline(make_cfg('progress=false').model, torch.device('cpu'), torch.float32)\n"
        "assert not pipe.random_weights\n"
        "assert not any(t.is_meta for t in [*pipe.dit.parameters(), *pipe.dit.buffers(), *pipe.text.parameters()])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
