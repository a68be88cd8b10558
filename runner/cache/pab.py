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
gate_msa * attn(...), cross_attn(...), gate_mlp * mlp(...), in the model dtype. The model is not
edited: on the block instance the module attribute (`attn`, `cross_attn`, `mlp`) and its residual
tap (`attn_delta`, ...) are shadowed by callables; the modules themselves stay in the module tree
(state-dict names unchanged). A reused module is not called, so a layout's hooks on it (DSP's
all-to-alls around spatial attention, Ulysses' around its kernels) do not run either. A reused
branch still computes its (cheap) norm and modulation, which are the module's argument.

Report: `pattern` has C for a step that reused nothing, R for one that reused some module;
`reuse_pattern` per kind; `computed_fraction` counts module calls (3 per block: self-attention,
cross-attention, MLP).
"""

from __future__ import annotations

import torch

from runner.cache.base import CachePolicy, tensor_bytes

SLOTS = {"self": ("attn", "attn_delta"), "cross": ("cross_attn", "cross_delta"), "mlp": ("mlp", "mlp_delta")}
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


class _Module:
    """Stands for block.<module>: calls it, or (reused) returns a zero the gate multiplies away."""

    def __init__(self, policy, key, module) -> None:
        self.policy, self.key, self.module = policy, key, module

    def __call__(self, *args, **kwargs):
        if self.key in self.policy.reusing:
            return self.policy.cache[self.key].new_zeros(())
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        if name == "module":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


class _Tap:
    """Stands for block.<tap>: the branch output; stores it, or (reused) replaces it by the stored one."""

    def __init__(self, policy, key, tap) -> None:
        self.policy, self.key, self.tap = policy, key, tap

    def __call__(self, x):
        p = self.policy
        if self.key in p.reusing:
            return p.cache[self.key]
        if self.key in p.storing:
            p.cache[self.key] = x.detach()
        return self.tap(x)


class PAB(CachePolicy):
    name = "pab"

    def __init__(self, cfg, comm=None) -> None:
        super().__init__()
        if len(cfg.pab_ranges) != 3 or min(cfg.pab_ranges) < 1 or len(cfg.pab_window) != 2:
            raise ValueError(f"cache.pab_ranges={list(cfg.pab_ranges)} must be 3 ranges >= 1 (spatial, temporal, "
                             f"cross) and cache.pab_window={list(cfg.pab_window)} a [low, high] pair")
        self.cfg = cfg
        self._shadowed = []  # (block, attribute)
        self.depth = 0
        self.mlp_layers: list[int] = []
        self.mlp_layers_absent: list[int] = []
        self.reset()

    def install(self, model) -> None:
        super().install(model)
        self.depth = len(model.spatial_blocks)
        if any(i < 0 for i in self.cfg.pab_mlp_blocks):
            self.model = None
            raise ValueError(f"cache.pab_mlp_blocks={list(self.cfg.pab_mlp_blocks)} has negative layers")
        # Open-Sora's layers 0-4 on a shallower model (the demo has 4): the layers it has, the rest reported.
        self.mlp_layers = [i for i in self.cfg.pab_mlp_blocks if i < self.depth]
        self.mlp_layers_absent = [i for i in self.cfg.pab_mlp_blocks if i >= self.depth]
        for kind in ("spatial", "temporal"):
            for i, blk in enumerate(getattr(model, f"{kind}_blocks")):
                for slot, (mod, tap) in SLOTS.items():
                    key = (kind, i, slot)
                    blk.__dict__[mod] = _Module(self, key, getattr(blk, mod))
                    blk.__dict__[tap] = _Tap(self, key, getattr(blk, tap))
                    self._shadowed += [(blk, mod), (blk, tap)]

    def uninstall(self) -> None:
        for blk, attr in self._shadowed:
            blk.__dict__.pop(attr, None)
        self._shadowed = []
        self.reset()
        super().uninstall()

    def reset(self) -> None:
        super().reset()
        c = self.cfg
        self.schedule = Schedule(c.pab_ranges, c.pab_window, c.pab_mlp, c.pab_mlp_keys, c.pab_mlp_skip)
        self.cache: dict = {}
        self.reusing: set = set()
        self.storing: set = set()
        self.kinds: dict[str, list[bool]] = {x: [] for x in (*ATTENTION, "mlp")}  # per step: reused?
        self.units = [0, 0]  # module calls computed, module calls in all
        self._peak = 0

    def _keys(self, kind: str):
        if kind == "cross":
            return [(b, i, "cross") for b in ("spatial", "temporal") for i in range(self.depth)]
        if kind == "mlp":
            return [(b, i, "mlp") for b in ("spatial", "temporal") for i in self.mlp_layers]
        return [(kind, i, "self") for i in range(self.depth)]

    def decide_compute(self, info) -> bool:
        if self.model is None:
            raise RuntimeError("PAB: begin_step before install(model)")
        want, store_mlp = self.schedule.step(info.index, info.timestep)
        last = info.index == info.num_steps - 1
        self.reusing, self.storing = set(), set()
        lo = self.cfg.pab_window[0]
        for kind in (*ATTENTION, "mlp"):
            keys = self._keys(kind)
            reuse = want[kind] and all(k in self.cache for k in keys)  # never reuse what was not stored
            self.kinds[kind].append(reuse)
            if reuse:
                self.reusing.update(keys)
            elif not last and (store_mlp if kind == "mlp" else bf16_timestep(info.timestep) > lo):
                self.storing.update(keys)  # attention: only while a later step can still be in the window
        for key in list(self.cache):
            if key not in self.reusing and key not in self.storing:
                del self.cache[key]
        total = 6 * self.depth
        self.units[0] += total - len(self.reusing)
        self.units[1] += total
        return not self.reusing

    def wrap_model_fn(self, fn):
        def model_fn(z_in, t_in, info):
            self.begin_step(info)
            try:
                return fn(z_in, t_in, info)
            finally:
                self._peak = max(self._peak, self.bytes_held())
                if info.index == info.num_steps - 1:
                    self.cache, self.reusing, self.storing = {}, set(), set()

        return model_fn

    def computed_fraction(self) -> float | None:
        return self.units[0] / self.units[1] if self.units[1] else None

    def bytes_held(self) -> int:
        return tensor_bytes(*self.cache.values())

    def report(self) -> dict:
        rep = super().report()
        c = self.cfg
        rep.update({
            "ranges": dict(zip(ATTENTION, c.pab_ranges)), "window": list(c.pab_window),
            "mlp": {"on": bool(c.pab_mlp), "keys": list(c.pab_mlp_keys), "layers": self.mlp_layers,
                    "layers_absent": self.mlp_layers_absent, "skip": c.pab_mlp_skip},
            "reuse_pattern": {x: "".join("R" if r else "C" for r in v) for x, v in self.kinds.items()},
            "bytes_held_peak": self._peak,
            "bytes_kept": "post-gate branch outputs of the broadcast modules (model dtype)",
        })
        return rep
