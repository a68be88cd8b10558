"""STDiT3, the spatial-temporal diffusion transformer of Open-Sora 1.2, as single-device code.

The forward is `f(x, timestep, y, mask, fps, height, width, x_mask=...)`. It is written in stages
(`embed`, `blocks`, `final`) over a (B, T, S, C) token tensor so that sequence-parallel layouts and
cache policies can wrap parts of it from outside; nothing here knows about ranks or caches.
Local sizes (frames, rows, heads) always come from tensor shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from models.layers import (
    CaptionEmbedder,
    FinalLayer,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    STDiT3Block,
    TimestepEmbedder,
    sincos_features,
)


@dataclass
class STDiT3Config:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True
    # Off in Open-Sora 1.2 (RoPE alone orders frames, and its causal VAE makes the first latent frame
    # distinct). A parameter-free sin-cos embedding of the frame index added to the input tokens, as
    # Open-Sora 1.0's STDiT had, for pixel-space models: from i.i.d. noise, RoPE alone tells frames
    # apart only near the clip's ends, and "moves left" must be drawn right early and left late.
    temporal_pos_embed: bool = False
    class_dropout_prob: float = 0.1  # training only: the probability of the null caption

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head dim must be even (rotary embedding)")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 (2-D position embedding)")

    @classmethod
    def from_dict(cls, d: dict) -> "STDiT3Config":
        """From a dict such as the published config.json; keys that are not architecture are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "patch_size" else v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


CONFIGS: dict[str, STDiT3Config] = {
    # The published Open-Sora 1.2 model (hpcai-tech/OpenSora-STDiT-v3).
    "STDiT3-XL/2": STDiT3Config(),
    "STDiT3-3B/2": STDiT3Config(hidden_size=1872, num_heads=26),
    # Small sizes for tests: same code, 4 latent channels, a small caption width.
    "STDiT3-tiny": STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16),
    "STDiT3-small": STDiT3Config(depth=4, hidden_size=128, num_heads=4, caption_channels=64, model_max_length=24),
}


def get_config(name: str, **overrides) -> STDiT3Config:
    if name not in CONFIGS:
        raise ValueError(f"unknown STDiT3 config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return dataclasses.replace(CONFIGS[name], **overrides)


@dataclass
class Embedded:
    """What `STDiT3.embed` hands to the blocks and the final layer.

    x is (B, T, S, C); t (B, C). t_mlp is (B, 6C), or per frame (B, T, 6C) when x_mask is given: then
    frames where x_mask (B, T) is False (given frames) carry t0_mlp, the modulation of timestep 0, so
    anything that runs a block with (x, y, y_mask, t_mlp) conditions them. t0 (B, C): timestep 0's t,
    for the final layer; None without x_mask.
    """

    x: torch.Tensor
    t: torch.Tensor
    t_mlp: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor | None
    grid: tuple[int, int, int]  # (Tp, Hp, Wp) of the whole token grid (x may hold a band of rows)
    out_size: tuple[int, int, int]  # (T, H, W) of the input, to crop the padded output
    x_mask: torch.Tensor | None = None
    t0: torch.Tensor | None = None


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.pos_embed = PositionEmbedding2D(c)
        self.rope = RotaryEmbedding(c // config.num_heads)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        args = (c, config.num_heads, config.mlp_ratio)
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(*args, axis="spatial", qk_norm=config.qk_norm) for _ in range(config.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(*args, axis="temporal", qk_norm=config.qk_norm, rope=self.rope) for _ in range(config.depth)
        )
        patch_numel = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.final_layer = FinalLayer(c, patch_numel, config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def null_caption(self) -> torch.Tensor:
        """The learned unconditional caption (model_max_length, caption_channels)."""
        return self.y_embedder.y_embedding

    # ---- stages -------------------------------------------------------------------------------

    def embed(self, x, timestep, y, mask=None, fps=24.0, height=None, width=None, rows=None,
              x_mask=None) -> Embedded:
        """Patchify, position-embed, embed timestep/fps and caption.

        x (B, Cin, T, H, W); timestep (B,) in [0, 1000]; y (B, L, Cc) or (B, 1, L, Cc);
        mask (B or B/k, L) with 1 for valid text tokens (repeated to B, as Open-Sora does for CFG).
        height/width are the pixel size used for the position-embedding scale (default: x's size).
        rows=(start, total) says that x is the band of patch rows [start, start + local rows) of a
        grid with `total` patch rows, so positions use the whole grid's coordinates.
        x_mask (B or B/k, T) bool, per sample and latent frame: False marks a given (conditioning)
        frame, which takes timestep 0's modulation in every block and in the final layer (Open-Sora
        1.2's image-to-video and extension). Repeated to B like `mask`, so with CFG one row per prompt
        serves both halves. Layouts hold every frame of their band, so it is never split.
        """
        dtype = self.dtype
        b = x.shape[0]
        out_size = tuple(x.shape[2:])
        h_px = float(height) if height is not None else float(x.shape[3])
        w_px = float(width) if width is not None else float(x.shape[4])

        tokens = self.x_embedder(x.to(dtype))  # (B, Tp, Hp, Wp, C)
        tp, hp, wp = tokens.shape[1:4]
        r0, total_rows = rows if rows is not None else (0, hp)
        scale = (h_px * w_px) ** 0.5 / self.config.input_sq_size
        base_size = round((total_rows * wp) ** 0.5)
        pos = self.pos_embed(total_rows, wp, scale=scale, base_size=base_size, rows=(r0, r0 + hp)).to(dtype)
        tokens = tokens.reshape(b, tp, hp * wp, -1) + pos
        if self.config.temporal_pos_embed:
            # Every rank holds all frames (layouts shard rows), so local frame indices are global.
            frames = torch.arange(tp, device=x.device)
            tokens = tokens + sincos_features(frames, tokens.shape[-1]).to(dtype)[None, :, None, :]

        # Open-Sora casts the timestep to the model dtype first (bf16 quantises it).
        timestep = torch.as_tensor(timestep, device=x.device).to(dtype).reshape(-1).expand(b)
        fps = torch.as_tensor(fps, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        fps_emb = self.fps_embedder(fps)
        t = self.t_embedder(timestep) + fps_emb
        t_mlp = self.t_block(t)
        t0 = None
        if x_mask is not None:
            x_mask = self._frame_mask(x_mask, b, tp, out_size[0])
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb  # same fps, timestep 0
            t_mlp = torch.where(x_mask[:, :, None], t_mlp[:, None], self.t_block(t0)[:, None])  # (B, T, 6C)

        if y.dim() == 4:
            y = y.squeeze(1)
        y = self.y_embedder(y.to(dtype))
        y_mask = None
        if mask is not None:
            y_mask = mask.to(device=x.device, dtype=torch.bool)
            if y_mask.shape[0] != b:
                y_mask = y_mask.repeat(b // y_mask.shape[0], 1)
        return Embedded(tokens, t, t_mlp, y, y_mask, (tp, total_rows, wp), out_size, x_mask, t0)

    def _frame_mask(self, x_mask, b: int, tp: int, frames: int) -> torch.Tensor:
        """x_mask as (B, Tp) bool on the tokens' device, its rows repeated to the batch (as Open-Sora's
        `repeat(2, 1)` for the CFG pair)."""
        x_mask = torch.as_tensor(x_mask).to(device=self.x_embedder.proj.weight.device, dtype=torch.bool)
        if x_mask.dim() != 2 or x_mask.shape[1] != tp or b % x_mask.shape[0]:
            raise ValueError(
                f"x_mask must be (rows, {tp}) with rows dividing the batch of {b} (one flag per sample and "
                f"latent frame: {frames} frames, {tp} token frames), got {tuple(x_mask.shape)}")
        return x_mask.repeat(b // x_mask.shape[0], 1)

    def blocks(self, e: Embedded) -> torch.Tensor:
        x = e.x
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, e.y, e.y_mask, e.t_mlp)
            x = temporal(x, e.y, e.y_mask, e.t_mlp)
        return x

    def final(self, x: torch.Tensor, e: Embedded) -> torch.Tensor:
        """(B, T, S, C) tokens -> (B, Cout, T, H, W) fp32, cropped to the input size."""
        x = self.final_layer(x, e.t, e.x_mask, e.t0)
        b, tp, s = x.shape[:3]
        wp = e.grid[2]
        hp = s // wp  # local rows: a layout may hand over a slice of rows
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, tp, hp, wp, pt, ph, pw, self.config.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, tp * pt, hp * ph, wp * pw)
        t_out, h_out, w_out = e.out_size
        return x[:, :, :t_out, :h_out, :w_out].float()

    def forward(self, x, timestep, y, mask=None, fps=24.0, height=None, width=None, rows=None,
                x_mask=None) -> torch.Tensor:
        e = self.embed(x, timestep, y, mask, fps, height, width, rows, x_mask)
        return self.final(self.blocks(e), e)


def init_weights(model: STDiT3, seed: int = 0) -> STDiT3:
    """Deterministic initialisation as Open-Sora trains it (xavier linears, zero biases,
    temporal branches zeroed so they start as identity), drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv3d)):
                w = mod.weight
                fan_out, fan_in = w.shape[0], w[0].numel()
                bound = (6.0 / (fan_in + fan_out)) ** 0.5
                w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)
                if mod.bias is not None:
                    mod.bias.zero_()
        for emb in (model.t_embedder, model.fps_embedder):
            emb.mlp[0].weight.copy_(torch.randn(emb.mlp[0].weight.shape, generator=gen) * 0.02)
            emb.mlp[2].weight.copy_(torch.randn(emb.mlp[2].weight.shape, generator=gen) * 0.02)
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        model.y_embedder.y_embedding.copy_(
            torch.randn(model.y_embedder.y_embedding.shape, generator=gen) / model.config.caption_channels**0.5
        )
        model.rope.freqs.copy_(RotaryEmbedding(model.config.hidden_size // model.config.num_heads).freqs)
        for blk in model.temporal_blocks:
            blk.attn.proj.weight.zero_()
            blk.cross_attn.proj.weight.zero_()
            blk.mlp.fc2.weight.zero_()
    return model


def build_stdit3(config: STDiT3Config, device: str | torch.device = "cpu", dtype=torch.float32, seed: int | None = 0):
    """Build STDiT3. On the meta device (seed ignored) for loading weights or counting parameters."""
    if str(device) == "meta":
        with torch.device("meta"):
            return STDiT3(config).to(dtype)
    model = STDiT3(config)
    if seed is not None:
        init_weights(model, seed)
    return model.to(device=device, dtype=dtype)
