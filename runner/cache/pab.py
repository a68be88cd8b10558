"""Pyramid Attention Broadcast (arXiv 2408.12588) as VideoSys runs it on Open-Sora 1.2.

Per attention kind X (spatial self-attention, temporal self-attention, cross-attention of both
block kinds) with range r_X and window (lo, hi) on the 0-1000 timestep scale: at step k (the
module's call counter, one per step, from 0) the stored output is reused iff lo < t < hi (strict)
and k % r_X != 0; otherwise the module computes and its output is stored. MLP broadcast: at a step
whose int(t) is one of the keys, the listed layers' MLPs (both block kinds) compute and store; the
next `pab_mlp_skip` steps reuse. t is the step's timestep rounded to bf16, as VideoSys compares it
(the Open-Sora keys 676, 788, 864 are 480p 2 s timesteps at 30 steps; other shapes meet them only
by chance, e.g. 720p 4 s meets 788 once); the decision is a host
function of the sampler's step index and timestep: no device sync, no agreement traffic.

What is stored is the branch as it is added to the residual stream, after the gate (VideoSys):
gate_msa * attn(...), cross_attn(...), gate_mlp * mlp(...), in the model dtype, kept and reused
through runner/cache/branches.py. A reused module is not called, so a layout's hooks on it (DSP's
all-to-alls around spatial attention, Ulysses' around its kernels) do not run either. A reused
branch still computes its (cheap) norm and modulation, which are the module's argument.

Report: `pattern` has C for a step that reused nothing, R for one that reused some module;
`reuse_pattern` per kind; `computed_fraction` counts module calls (3 per block: self-attention,
cross-attention, MLP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from runner.cache.base import CachePolicy, PolicyConfig, tensor_bytes
from runner.cache.branches import SLOTS, Branches

ATTENTION = ("spatial", "temporal", "cross")


def bf16_timestep(t: float) -> float:
    """t as the model sees it in bf16 (a host op on a CPU scalar)."""
    return float(torch.tensor(float(t), dtype=torch.float32).to(torch.bfloat16).item())


class Schedule:
    """The PAB rule on host values: `step(k, t)` -> which kinds reuse, and whether MLPs store."""

    def __init__(self, ranges, window, mlp: bool, mlp_keys, mlp_skip: int) -> None:
        self.ranges = dict(zip(ATTENTION, ranges))
        self.window = tuple(window)
        self.mlp, self.mlp_keys, self.mlp_skip = mlp, {int(k) for k in mlp_keys}, mlp_skip
        self.left = 0  # MLP steps still to reuse

    def step(self, k: int, t: float) -> tuple[dict, bool]:
        """({kind: reuse?} for spatial/temporal/cross/mlp, store MLP outputs?) at step k, timestep t."""
        tb = bf16_timestep(t)
        lo, hi = self.window
        reuse = {x: lo < tb < hi and k % r != 0 for x, r in self.ranges.items()}
        store_mlp = False
        reuse["mlp"] = False
        if self.mlp:
            if int(tb) in self.mlp_keys:
                store_mlp, self.left = True, self.mlp_skip
            elif self.left > 0:
                reuse["mlp"], self.left = True, self.left - 1
        return reuse, store_mlp


@dataclass
class PABConfig(PolicyConfig):
    """cache=pab246, pab357, pab579."""

    name: str = "pab"
    # Reuse an attention output while lo < t < hi (bf16 t, strict) and step % range != 0; ranges for
    # spatial, temporal, cross (PAB246: 2, 4, 6).
    pab_ranges: List[int] = field(default_factory=lambda: [2, 4, 6])
    pab_window: List[float] = field(default_factory=lambda: [450.0, 930.0])
    # MLP broadcast: at int(t) in keys the listed layers' MLPs (both kinds) store, the next `skip` steps reuse.
    pab_mlp: bool = True
    pab_mlp_keys: List[int] = field(default_factory=lambda: [676, 788, 864])
    pab_mlp_blocks: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pab_mlp_skip: int = 2

    def problems(self) -> list[str]:
        out = []
        if len(self.pab_ranges) != 3 or min(self.pab_ranges, default=0) < 1:
            out.append(f"cache.pab_ranges={list(self.pab_ranges)} must be 3 ranges >= 1 (spatial, temporal, cross)")
        if len(self.pab_window) != 2 or not self.pab_window[0] < self.pab_window[1]:
            out.append(f"cache.pab_window={list(self.pab_window)} must be [low, high] timesteps with low < high")
        if any(i < 0 for i in self.pab_mlp_blocks):
            out.append(f"cache.pab_mlp_blocks={list(self.pab_mlp_blocks)} has negative layers")
        if self.pab_mlp_skip < 0:
            out.append(f"cache.pab_mlp_skip={self.pab_mlp_skip} must be >= 0")
        return out

    def build(self, comm=None) -> "PAB":
        return PAB(self, comm)


class PAB(CachePolicy):
    name = "pab"

    def __init__(self, cfg: PABConfig, comm=None) -> None:
        cfg.check()
        self.depth = 0
        self.mlp_layers: list[int] = []
        self.mlp_layers_absent: list[int] = []
        super().__init__(cfg, comm)

    def install(self, model) -> None:
        super().install(model)
        self.depth = len(model.spatial_blocks)
        # Open-Sora's layers 0-4 on a shallower model (the demo has 4): the layers it has, the rest reported.
        self.mlp_layers = [i for i in self.cfg.pab_mlp_blocks if i < self.depth]
        self.mlp_layers_absent = [i for i in self.cfg.pab_mlp_blocks if i >= self.depth]
        self.branches = Branches(model, [(kind, i, slot) for kind in ("spatial", "temporal")
                                         for i in range(self.depth) for slot in SLOTS])

    def reset(self) -> None:
        super().reset()
        c = self.cfg
        self.schedule = Schedule(c.pab_ranges, c.pab_window, c.pab_mlp, c.pab_mlp_keys, c.pab_mlp_skip)
        if self.branches is not None:
            self.branches.clear()
        self.kinds: dict[str, list[bool]] = {x: [] for x in (*ATTENTION, "mlp")}  # per step: reused?
        self.units = [0, 0]  # module calls computed, module calls in all

    def _keys(self, kind: str):
        if kind == "cross":
            return [(b, i, "cross") for b in ("spatial", "temporal") for i in range(self.depth)]
        if kind == "mlp":
            return [(b, i, "mlp") for b in ("spatial", "temporal") for i in self.mlp_layers]
        return [(kind, i, "self") for i in range(self.depth)]

    def run(self, e, step):
        want, store_mlp = self.schedule.step(step.index, step.timestep)
        last = step.index == step.num_steps - 1
        reusing, keeping = set(), set()
        lo = self.cfg.pab_window[0]
        for kind in (*ATTENTION, "mlp"):
            keys = self._keys(kind)
            reuse = want[kind] and all(k in self.branches.kept for k in keys)  # never reuse what was not kept
            self.kinds[kind].append(reuse)
            if reuse:
                reusing.update(keys)
            elif not last and (store_mlp if kind == "mlp" else bf16_timestep(step.timestep) > lo):
                keeping.update(keys)  # attention: only while a later step can still be in the window
        self.branches.plan(reuse=reusing, keep=keeping)
        total = 6 * self.depth
        self.units[0] += total - len(reusing)
        self.units[1] += total
        self.computed[step.index] = not reusing
        return self.model.blocks(e)

    def release(self) -> None:
        self.branches.clear()

    # -- step checkpoints: the rule is a host function of the step and its timestep, which the stop
    # check before a step does not see, and a step that reuses still runs most of its collectives, so
    # every boundary may hold one (as TeaCache's). The state: the MLP countdown, the pattern so far and
    # the kept branch outputs, as bands (B, T, S_r, C): the residual stream's layout, whatever a
    # layout does inside attention.
    checkpointable = True

    def state(self) -> dict:
        out = super().state()
        out["meta"].update(mlp_left=self.schedule.left, kinds={k: list(v) for k, v in self.kinds.items()},
                           units=list(self.units))
        out["tensors"] = {f"{kind}.{layer}.{slot}": t for (kind, layer, slot), t in self.branches.kept.items()}
        out["bands"] = {name: 2 for name in out["tensors"]}
        return out

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        meta = state["meta"]
        self.schedule.left, self.units = meta["mlp_left"], list(meta["units"])
        self.kinds = {k: list(v) for k, v in meta["kinds"].items()}
        for name, t in state["tensors"].items():
            kind, layer, slot = name.split(".")
            self.branches.kept[(kind, int(layer), slot)] = t

    def computed_fraction(self) -> float | None:
        return self.units[0] / self.units[1] if self.units[1] else None

    def bytes_held(self) -> int:
        return tensor_bytes(*self.branches.kept.values()) if self.branches is not None else 0

    def report(self) -> dict:
        rep = super().report()
        c = self.cfg
        rep.update({
            "ranges": dict(zip(ATTENTION, c.pab_ranges)), "window": list(c.pab_window),
            "mlp": {"on": bool(c.pab_mlp), "keys": list(c.pab_mlp_keys), "layers": self.mlp_layers,
                    "layers_absent": self.mlp_layers_absent, "skip": c.pab_mlp_skip},
            "reuse_pattern": {x: "".join("R" if r else "C" for r in v) for x, v in self.kinds.items()},
            "bytes_kept": "post-gate branch outputs of the broadcast modules (model dtype)",
        })
        return rep
