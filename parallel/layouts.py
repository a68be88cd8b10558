"""Sequence-parallel layouts of STDiT3, applied from outside the model.

    sp = parallelize(model, mesh, comm, layout="dsp")   # or "ulysses"
    shard = sp.shard(z.shape)                          # bind this latent's geometry (a RowShard)
    out = model(shard.slice(z), t, y, mask, ..., rows=shard.rows)   # this rank's band of the output
    z_full = shard.assemble(z_band, comm)               # once, after the last step

The latent, and so the token grid, is sharded by whole patch rows (`parallel.shard`): every rank
holds tokens (B, T, S_r, C), S_r = its patch rows x Wp. Embedding, temporal attention, cross-attention
(DSP), MLPs and the final layer are per-token or per-position and run locally on the band.

DSP (default): the spatial self-attention of every spatial block switches to time-sharding for
the attention itself. A forward pre-hook on `block.attn` all-to-alls x (B, T, S_r, C) ->
(B, T_r, S, C) (scatter T, gather S), the attention runs on whole frames, and a forward hook
switches the result back. 2 all-to-alls of E/p per layer pair (E: the hidden state's bytes),
nothing else. T and S are split unevenly (`split_sizes`), without padding, so any p works.

Ulysses (Open-Sora 1.2's layout): S-sharded throughout. Hooks on the spatial blocks'
`attn.attend` all-to-all the stacked q, k, v (B*T, H, S_r, D) -> (B*T, H/p, S, D) (one op, 3E/p) and
the output back (E/p); hooks on the spatial blocks' `cross_attn.attend` do the same for the query
(B, H, T*S_r, D) and output (E/p each), while the text K/V (B, H, L, D) are sliced to this rank's
heads locally (the per-sample batch layout of the fixed Open-Sora code, PR 510). 4 all-to-alls
and 6E/p per spatial block; needs heads % p == 0. Temporal blocks are local, as in Open-Sora.

The layouts are hooks (removable with `sp.remove()`), not replacement modules: the model's module
tree and state-dict names stay those of the checkpoint, and a cache policy wrapped around a module
later skips the hooks, and so the collectives, whenever it skips the module.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.comm import Comm
from parallel.mesh import Mesh
from parallel.shard import RowShard, row_shard

LAYOUTS = ("dsp", "ulysses")


class SequenceParallel:
    """A layout installed on a model: the geometry of the current latent, and the hooks."""

    def __init__(self, model: nn.Module, mesh: Mesh, comm: Comm, layout: str, group: str = "sp"):
        self.model, self.mesh, self.comm, self.layout, self.group = model, mesh, comm, layout, group
        self.size = comm.size(group)
        self.rank = comm.rank(group)
        self.geometry: RowShard | None = None
        self._handles: list = []

    # ---- geometry
    def shard(self, latent_shape) -> RowShard:
        """The RowShard of a latent (..., T, H, W) for this rank, bound for the next forwards."""
        self.geometry = row_shard(latent_shape, self.model.config.patch_size, self.size, self.rank)
        return self.geometry

    def _bound(self, what: str, got, want_of) -> RowShard:
        """The bound geometry, checked against what a hook received (want_of(geometry) == got)."""
        g = self.geometry
        if g is None:
            raise RuntimeError(f"{self.layout}: no latent geometry bound; call sp.shard(latent_shape) before the forward")
        if got != want_of(g):
            raise RuntimeError(
                f"{self.layout} {what}: got {got}, the bound geometry expects {want_of(g)}; shard the latent with "
                "sp.shard(z.shape) and run the model on shard.slice(z) with rows=shard.rows")
        return g

    # ---- hooks
    def _hook(self, module: nn.Module, pre, post) -> None:
        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        """Take the layout off the model (the model is single-device again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model.__dict__.pop("_sequence_parallel", None)

    @property
    def num_hooked(self) -> int:
        return len(self._handles) // 2

    def describe(self) -> dict:
        return {"layout": self.layout, "sp": self.size, "sp_rank": self.rank, "hooked_modules": self.num_hooked}

    # ---- DSP: switch S-shard <-> T-shard around spatial self-attention
    def _dsp_to_time(self, module, args):
        x = args[0]  # (B, T, S_r, C)
        g = self._bound("spatial attention (T, S_r)", tuple(x.shape[1:3]),
                        lambda g: (g.frame_tokens, g.token_sizes[self.rank]))
        x = self.comm.all_to_all(x, self.group, scatter_dim=1, gather_dim=2, scatter_sizes=g.frame_sizes,
                                 gather_sizes=g.token_sizes, tag="dsp.to_time")
        return (x, *args[1:])

    def _dsp_to_space(self, module, args, out):
        g = self.geometry  # (B, T_r, S, C) -> (B, T, S_r, C)
        return self.comm.all_to_all(out, self.group, scatter_dim=2, gather_dim=1, scatter_sizes=g.token_sizes,
                                    gather_sizes=g.frame_sizes, tag="dsp.to_space")

    # ---- Ulysses: sequence <-> heads around the attention kernels of spatial blocks
    def _heads(self, h: int) -> list[int]:
        return [h // self.size] * self.size

    def _uly_self_in(self, module, args):
        q, k, v = args[:3]  # (B*T, H, S_r, D) each
        g = self._bound("spatial attention S_r", q.shape[2], lambda g: g.token_sizes[self.rank])
        qkv = self.comm.all_to_all(torch.stack([q, k, v]), self.group, scatter_dim=2, gather_dim=3,
                                   scatter_sizes=self._heads(q.shape[1]), gather_sizes=g.token_sizes,
                                   tag="ulysses.qkv")
        return (*qkv.unbind(0), *args[3:])

    def _uly_self_out(self, module, args, out):
        # (B*T, H/p, S, D) -> (B*T, H, S_r, D)
        return self.comm.all_to_all(out, self.group, scatter_dim=2, gather_dim=1,
                                    scatter_sizes=self.geometry.token_sizes, gather_sizes=self._heads(
                                        out.shape[1] * self.size), tag="ulysses.attn_out")

    def _seq_sizes(self) -> list[int]:
        g = self.geometry
        return [g.frame_tokens * s for s in g.token_sizes]

    def _uly_cross_in(self, module, args):
        q, k, v = args[:3]  # q (B, H, T*S_r, D); k, v (B, H, L, D): the full text, all heads
        self._bound("cross-attention T*S_r", q.shape[2], lambda g: g.frame_tokens * g.token_sizes[self.rank])
        h = q.shape[1]
        q = self.comm.all_to_all(q, self.group, scatter_dim=1, gather_dim=2, scatter_sizes=self._heads(h),
                                 gather_sizes=self._seq_sizes(), tag="ulysses.cross_q")
        a, b = self.rank * h // self.size, (self.rank + 1) * h // self.size
        return (q, k[:, a:b], v[:, a:b], *args[3:])

    def _uly_cross_out(self, module, args, out):
        # (B, H/p, T*S, D) -> (B, H, T*S_r, D)
        return self.comm.all_to_all(out, self.group, scatter_dim=2, gather_dim=1, scatter_sizes=self._seq_sizes(),
                                    gather_sizes=self._heads(out.shape[1] * self.size), tag="ulysses.cross_out")


def parallelize(model: nn.Module, mesh: Mesh, comm: Comm, layout: str = "dsp", group: str = "sp") -> SequenceParallel:
    """Install a sequence-parallel layout on an STDiT3 (in place) and return its handle.

    With an sp group of one rank nothing is installed (the handle still shards trivially).
    ValueError for an unknown layout, Ulysses with heads % sp != 0, or a model already parallelized.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence-parallel layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    if "_sequence_parallel" in model.__dict__:
        raise ValueError("the model already has a sequence-parallel layout; call .remove() on it first")
    sp = SequenceParallel(model, mesh, comm, layout, group)
    heads = model.config.num_heads
    if layout == "ulysses" and heads % sp.size:
        ok = [p for p in range(1, heads + 1) if heads % p == 0]
        raise ValueError(
            f"layout=ulysses splits the {heads} attention heads over parallel.sp={sp.size} ranks, which needs "
            f"heads % sp == 0; use sp in {ok} or parallel.layout=dsp (any sp)")
    if sp.size > 1:
        for block in model.spatial_blocks:
            if layout == "dsp":
                sp._hook(block.attn, sp._dsp_to_time, sp._dsp_to_space)
            else:
                sp._hook(block.attn.attend, sp._uly_self_in, sp._uly_self_out)
                sp._hook(block.cross_attn.attend, sp._uly_cross_in, sp._uly_cross_out)
    model.__dict__["_sequence_parallel"] = sp  # a plain attribute: not a module, not in the state dict
    return sp
