"""Analytic FLOP count of one STDiT3 forward (matmuls, convolutions and attention; 2 FLOPs per MAC).

Elementwise work (norms, modulation, activations, softmax) is left out, as torch's FlopCounterMode
and the papers' figures do.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.stdit3 import STDiT3Config


@dataclass
class FlopBreakdown:
    embed: int
    spatial_attn: int  # QK^T and AV of spatial self-attention, all blocks
    temporal_attn: int
    cross_attn: int  # QK^T and AV of cross-attention
    linear: int  # every projection inside the blocks
    final: int

    @property
    def total(self) -> int:
        return self.embed + self.spatial_attn + self.temporal_attn + self.cross_attn + self.linear + self.final


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stdit3_flops(cfg: STDiT3Config, batch: int, frames: int, height: int, width: int, text_len: int) -> FlopBreakdown:
    """One forward on a (batch, in_channels, frames, height, width) latent with `text_len` text tokens
    per sample (the CFG pair counts as batch 2)."""
    c, d = cfg.hidden_size, cfg.depth
    pt, ph, pw = cfg.patch_size
    t, hp, wp = _ceil_div(frames, pt), _ceil_div(height, ph), _ceil_div(width, pw)
    s = hp * wp
    n = batch * t * s  # video tokens
    hidden = int(c * cfg.mlp_ratio)
    embed = (
        2 * n * cfg.in_channels * pt * ph * pw * c  # patch conv
        + 2 * batch * 2 * (256 * c + c * c)  # timestep and fps embedders
        + 2 * batch * c * 6 * c  # t_block
        + 2 * batch * text_len * (cfg.caption_channels * c + c * c)  # caption projection
    )
    per_block_linear = (
        2 * n * (3 * c * c + c * c)  # qkv, proj
        + 2 * n * 2 * c * c  # cross q, proj
        + 2 * batch * text_len * 2 * c * c  # cross kv
        + 2 * n * 2 * c * hidden  # mlp
    )
    spatial_attn = d * 4 * batch * t * s * s * c
    temporal_attn = d * 4 * batch * s * t * t * c
    cross_attn = 2 * d * 4 * n * text_len * c
    final = 2 * n * c * pt * ph * pw * cfg.out_channels
    return FlopBreakdown(embed, spatial_attn, temporal_attn, cross_attn, 2 * d * per_block_linear, final)
