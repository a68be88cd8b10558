"""Building blocks of STDiT3 (Open-Sora 1.2), single-device and shape-tolerant.

Shape legend: B batch (both CFG halves), T frames, S spatial tokens per frame (Hp*Wp), C hidden,
H heads (local: derived from tensors, so a layout may shard them), D head dim, L text tokens.
Parameter names follow the published checkpoint `hpcai-tech/OpenSora-STDiT-v3`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def initial_value(shape: tuple[int, ...], make) -> torch.Tensor:
    """`make()`, a parameter's or buffer's initial value; only an empty tensor of `shape` when built on
    the meta device, where loading supplies the values: arithmetic on meta tensors runs Python
    reference kernels that import torch._dynamo (about 1 s of start-up)."""
    if torch.empty(0).is_meta:
        return torch.empty(shape, dtype=torch.float32)
    return make()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] features of a scalar per row (Open-Sora puts cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar -> C: 256 sin-cos features, Linear, SiLU, Linear (also used for fps)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sincos_features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states to C; holds the learned null caption used for CFG."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer(
            "y_embedding",
            initial_value((token_num, in_channels), lambda: torch.randn(token_num, in_channels) / in_channels**0.5),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch; pads T, H, W at the end up to a multiple of the patch."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, T, H, W) -> (B, Tp, Hp, Wp, C)."""
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        pad = (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt)
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x).permute(0, 2, 3, 4, 1)


class PositionEmbedding2D(nn.Module):
    """2-D sin-cos embedding of the patch grid; the first half encodes the column coordinate.

    Coordinates are scaled so that the grid spans `base_size` units divided by `scale`
    (scale = sqrt(height*width)/input_sq_size), as in Open-Sora 1.2.
    """

    def __init__(self, dim: int):
        super().__init__()
        assert dim % 4 == 0, "hidden size must be divisible by 4"
        self.dim = dim
        half = dim // 2
        self.register_buffer(
            "inv_freq",
            initial_value((half // 2,), lambda: 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))),
            persistent=False,
        )

    def forward(self, hp: int, wp: int, scale: float, base_size: int, rows: tuple[int, int] | None = None):
        """Embedding (S, C) for the grid rows [rows[0], rows[1]) of an hp x wp grid (all rows by default)."""
        r0, r1 = rows if rows is not None else (0, hp)
        device = self.inv_freq.device
        r = torch.arange(r0, r1, device=device, dtype=torch.float32) / scale * (base_size / hp)
        c = torch.arange(wp, device=device, dtype=torch.float32) / scale * (base_size / wp)
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        inv_freq = self.inv_freq.float()

        def feats(v):
            a = v.reshape(-1)[:, None] * inv_freq[None]
            return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

        return torch.cat([feats(cc), feats(rr)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in fp32 (LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with interleaved pairs (rotary_embedding_torch 0.5.3 semantics)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        # A Parameter in the reference implementation, hence a state-dict key `rope.freqs`.
        self.freqs = nn.Parameter(
            initial_value((dim // 2,), lambda: 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., N, D) along N with positions 0..N-1."""
        n = x.shape[-2]
        pos = torch.arange(n, device=x.device, dtype=self.freqs.dtype)
        angles = (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # (N, D): f0 f0 f1 f1 ...
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos + rotated * sin


class Attend(nn.Module):
    """Scaled dot-product attention on (B, H, N, D) tensors.

    A module of its own so that a sequence-parallel layout (Ulysses) can wrap exactly the part
    that needs the full sequence. `key_mask` (B, Lk) bool marks valid keys.
    """

    def forward(self, q, k, v, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention over one axis of a (B, T, S, C) tensor.

    axis="spatial" attends over S within each frame, axis="temporal" over T at each position.
    """

    def __init__(self, dim: int, num_heads: int, axis: str, qk_norm: bool = True, rope: RotaryEmbedding | None = None):
        super().__init__()
        assert axis in ("spatial", "temporal")
        self.axis = axis
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attend = Attend()
        # Shared with the model (a plain attribute, not a submodule, so its parameter is stored once as `rope.freqs`).
        self.__dict__["rope"] = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, s, c = x.shape
        seq = x if self.axis == "spatial" else x.transpose(1, 2)  # (B, A, N, C): attention over N
        a, n = seq.shape[1], seq.shape[2]
        qkv = self.qkv(seq.reshape(b * a, n, c)).unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*A, H, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        o = self.attend(q, k, v).transpose(1, 2).reshape(b, a, n, c)
        o = self.proj(o)
        return o if self.axis == "spatial" else o.transpose(1, 2)


class CrossAttention(nn.Module):
    """Every video token attends to its own sample's valid text tokens (no norm, no gate)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.attend = Attend()

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, S, C), y (B, L, C), y_mask (B, L) bool."""
        b, t, s, c = x.shape
        q = self.q_linear(x.reshape(b, t * s, c)).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        kv = self.kv_linear(y).unflatten(-1, (2, -1, self.head_dim)).permute(2, 0, 3, 1, 4)
        o = self.attend(q, kv[0], kv[1], y_mask)  # (B, H, T*S, D)
        return self.proj(o.transpose(1, 2).reshape(b, t, s, c))


class STDiT3Block(nn.Module):
    """One spatial or temporal block: adaLN-single modulated self-attention, cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, axis: str, qk_norm: bool, rope=None):
        super().__init__()
        self.axis = axis
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, axis, qk_norm=qk_norm, rope=rope)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(initial_value((6, dim), lambda: torch.randn(6, dim) / dim**0.5))
        # Parameter-free taps on the three residual increments, for observers outside the model
        # (forward hooks of cache policies); identity here.
        self.attn_delta = nn.Identity()
        self.cross_delta = nn.Identity()
        self.mlp_delta = nn.Identity()

    def modulation(self, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift1, scale1, gate1, shift2, scale2, gate2, each (B, T or 1, 1, C), from t_mlp (B, 6C) (one
        timestep per sample) or (B, T, 6C) (per frame: with an x_mask, given frames carry timestep 0's).

        Picking t_mlp per frame before adding the table gives, element for element, the values of
        Open-Sora's `t_mask_select`, which modulates with both and picks the results per frame.
        """
        b, c = t_mlp.shape[0], self.scale_shift_table.shape[1]
        mod = self.scale_shift_table + t_mlp.reshape(b, -1, 6, c)  # (B, T or 1, 6, C)
        return mod.unsqueeze(3).unbind(2)

    def forward(self, x, y, y_mask, t_mlp):
        """x (B, T, S, C); t_mlp (B, 6C) or per frame (B, T, 6C), from the shared t_block (`modulation`).

        Spatial and temporal blocks alike modulate frame t of x with row t: the modulation is applied
        outside `attn`, so a layout that re-shards only inside `attn` never sees it.
        """
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t_mlp)
        x = x + self.attn_delta(gate1 * self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.cross_delta(self.cross_attn(x, y, y_mask))
        x = x + self.mlp_delta(gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm with t (not t_mlp) and a 2xC table, then a linear to patch outputs."""

    def __init__(self, dim: int, patch_numel: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, patch_numel * out_channels)
        self.scale_shift_table = nn.Parameter(initial_value((2, dim), lambda: torch.randn(2, dim) / dim**0.5))

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None,
                t0: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, S, C), t (B, C); frames where x_mask (B, T) is False use t0 (B, C), timestep 0's."""
        b, c = x.shape[0], x.shape[-1]
        shift, scale = (self.scale_shift_table[None] + t[:, None]).reshape(b, 2, 1, 1, c).unbind(1)
        h = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            # As Open-Sora 1.2's T2IFinalLayer (which reassigns x first): the t0 branch normalises the
            # already t-modulated tokens, not x. The published weights were trained with this, so it stays.
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).reshape(b, 2, 1, 1, c).unbind(1)
            h = torch.where(x_mask[:, :, None, None], h, modulate(self.norm_final(h), shift0, scale0))
        return self.linear(h)
