"""Causal temporal VAE of Open-Sora 1.2 (``VAE_Temporal_SD``).

A MAGVIT-v2 style 3D conv autoencoder that runs on the *spatial* latents of the 2D VAE
(4 channels, already 8x smaller in H and W) and compresses time by 4. Every convolution is
causal in time: it pads only at the front, by ``(k_t - 1) + (1 - stride_t)`` frames, and
pads H and W symmetrically.

The module tree reproduces the published parameter names and shapes, so the ``temporal_vae.*``
tensors of ``hpcai-tech/OpenSora-VAE-v1.2`` load strictly into :class:`TemporalVAE` once the
prefix is stripped (``OpenSoraVAE`` in ``models/vae.py`` keeps the prefix and loads the whole
file). Widths are configurable through :class:`TemporalVAEConfig` so tests can build tiny
models with the same key layout.

One call of :meth:`TemporalVAE.encode` / :meth:`TemporalVAE.decode` handles one chunk; the
17-frame chunking of the pipeline lives in ``OpenSoraVAE``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Hyper-parameters; the defaults are the published ``VAE_Temporal_SD``."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                "temporal_downsample needs one entry per level transition: "
                f"{len(self.channel_multipliers) - 1} for channel_multipliers={self.channel_multipliers}, "
                f"got {self.temporal_downsample}"
            )
        for mult in self.channel_multipliers:
            if (self.filters * mult) % self.num_groups:
                raise ValueError(
                    f"num_groups={self.num_groups} must divide every width filters*multiplier "
                    f"(filters={self.filters}, multipliers={self.channel_multipliers})"
                )

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(d) for d in self.temporal_downsample)


class CausalConv3d(nn.Module):
    """Conv3d that is causal in time; the weight lives at ``.conv`` (published naming)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, time_stride: int = 1, bias: bool = True):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        kt, kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {kernel_size}")
        front = (kt - 1) + (1 - time_stride)
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, front, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, bias-free convs, 1x1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv3 is None else self.conv3(x)
        return h + skip


def _res_stack(widths_in_out, num_groups) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(i, o, num_groups) for i, o in widths_in_out)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        width = cfg.filters
        for level, level_width in enumerate(widths):
            pairs = [(width if j == 0 else level_width, level_width) for j in range(cfg.num_res_blocks)]
            self.block_res_blocks.append(_res_stack(pairs, cfg.num_groups))
            width = level_width
            if level < len(widths) - 1:
                if cfg.temporal_downsample[level]:
                    self.conv_blocks.append(CausalConv3d(width, width, 3, time_stride=2))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = _res_stack([(width, width)] * cfg.num_res_blocks, cfg.num_groups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, width)
        self.conv2 = CausalConv3d(width, 2 * cfg.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        top = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, top, 3)
        self.res_blocks = _res_stack([(top, top)] * cfg.num_res_blocks, cfg.num_groups)
        # Built deepest level first (that is the order channels flow), stored shallowest first,
        # so that index i of block_res_blocks is level i and conv_blocks[i - 1] upsamples into it.
        res_levels: list[nn.ModuleList] = []
        ups: list[nn.Module] = []
        width = top
        for level in reversed(range(len(widths))):
            pairs = [(width if j == 0 else widths[level], widths[level]) for j in range(cfg.num_res_blocks)]
            res_levels.insert(0, _res_stack(pairs, cfg.num_groups))
            width = widths[level]
            if level > 0:
                if cfg.temporal_downsample[level - 1]:
                    ups.insert(0, CausalConv3d(width, width * 2, 3))
                else:
                    ups.insert(0, nn.Identity())
        self.block_res_blocks = nn.ModuleList(res_levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, width)
        self.conv_out = CausalConv3d(width, cfg.in_out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0:
                x = self.conv_blocks[level - 1](x)
                if self.cfg.temporal_downsample[level - 1]:
                    # depth to time: channel (c * 2 + j) becomes frame (2 t + j) of channel c
                    x = rearrange(x, "b (c s) t h w -> b c (t s) h w", s=2)
        return self.conv_out(F.silu(self.norm1(x)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)); mean = channels [0, C), logvar = [C, 2C)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise


class TemporalVAE(nn.Module):
    """``VAE_Temporal_SD``: state-dict keys ``encoder.*``, ``quant_conv.conv.*``,
    ``post_quant_conv.conv.*``, ``decoder.*`` exactly as published."""

    def __init__(self, config: TemporalVAEConfig | None = None):
        super().__init__()
        self.config = config or TemporalVAEConfig()
        cfg = self.config
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    @property
    def time_factor(self) -> int:
        return self.config.time_factor

    def front_padding(self, num_frames: int) -> int:
        """Zero frames put in front of a chunk so its length divides by the time factor."""
        return (-num_frames) % self.time_factor

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames + self.front_padding(num_frames)) // self.time_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, C, T, h, w) spatial latents of one chunk -> posterior over (B, C, T', h, w)."""
        pad = self.front_padding(x.shape[2])
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """z: (B, C, T', h, w) latents of one chunk -> (B, C, num_frames, h, w).

        The decoder yields ``T' * time_factor`` frames; the first ``front_padding(num_frames)``
        are dropped (20 -> 17 for a full Open-Sora chunk).
        """
        expected = self.latent_frames(num_frames)
        if z.shape[2] != expected:
            raise ValueError(f"{num_frames} frames need {expected} latent frames, got {z.shape[2]}")
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.front_padding(num_frames):]
