"""AdaCache (arXiv 2411.02397) with MoReg, as released, with one whole-stack residual.

Schedule (released rule, 1-based s = sampler index + 1): step s computes iff s == last + rate or
s in {1, N-1, N}; rate starts at 1, so steps 1 and 2 compute. On a computed step with a previous
metric residual, the distance c (see `metric.decide`) picks the next rate from the codebook; it
applies from the next step. The whole DiT recomputes or reuses together.

What is kept (the improvement over the released 2 x 56 per-block tensors): the blocks stage's
x_out - x_in of the last computed step, in fp32, and the metric residual(s) of that step. On a
reused step the blocks stage returns e.x + residual; embed and final run every step with the
current timestep. Because a reused block only adds its cached increments, this equals the
per-block form up to summation order.

Rank agreement: the metric's partial sums of every site go into one float64 tensor and one
`comm.all_reduce(group="agree")` per computed step (none on reused steps, none on the last step,
whose decision nothing uses); the decision is a pure function of the reduced sums.
`verify_agreement` additionally gathers every rank's decision and raises on any mismatch.
The sums need no padding mask: the DSP/Ulysses layouts split rows unevenly without padding.
With CFG-parallel the agreement group spans the CFG pair, so the pair takes one joint decision from
the metric over both halves, exactly as the released code (one batched [cond; uncond] forward).

The metric residuals are the post-gate branch outputs at the sites, kept through
runner/cache/branches.py during a computed step. The residual is added in fp32 and rounded once to
the model dtype; a per-block bf16 cache rounds after every block. The decision needs one host sync per computed step (`tolist`), none on reused steps.

Reference frames (runner/conditioning.py). The relative-L1 distance covers all frames, given ones
included, as the released code would on a conditioned batch: every token feeds the blocks' output
that a reused step replays (given frames, with timestep 0's modulation and a constant input, may
change less than generated ones and so lower the distance somewhat). MoReg's
motion score counts only pairs of frames generated at that step (the step's x_mask, the same on
every rank): the jump between a given frame and its generated neighbour is conditioning, not
motion. Every rank holds all frames of its rows, so both stay partial sums over local data and the
agreement stays one all-reduce. Without given frames (no x_mask, or all generated) the sums are
the released ones, bit for bit. The reused residual covers given frames too; the sampler sets
them back to the reference after every step, so a reused step cannot move them. Each loop of
`loop=N` is a new generation from step 0, where the policy resets.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field
from typing import List, Optional

from runner.cache.base import (
    AgreedPolicy, CacheAgreementError, PolicyConfig, add_residual, fp32_residual, json_safe, tensor_bytes,
)
from runner.cache.branches import Branches
from runner.cache.codebook import PUBLISHED, SPEEDS, moreg_window, select_codebook
from runner.cache.metric import Decision, MoRegParams, decide, site_sums

RESIDUALS = ("t-attn", "s-attn", "ca-mlp")


__all__ = ["AdaCache", "AdaCacheConfig", "CacheAgreementError", "RESIDUALS"]


@dataclass
class AdaCacheConfig(PolicyConfig):
    """cache=adacache, adacache-slow, adacache-moreg."""

    name: str = "adacache"
    # fast | slow: which published codebook.
    speed: str = "fast"
    # Use the published codebook of this many steps (30 or 100); null: the one of sampler.num_steps,
    # or the nearest published step count (reported as approximate).
    codebook_steps: Optional[int] = None
    # A custom codebook instead: rate codebook_rates[i] for the first i with distance < thresholds[i],
    # else codebook_rates[-1] (one more rate than thresholds).
    codebook_thresholds: Optional[List[float]] = None
    codebook_rates: Optional[List[int]] = None
    # Layers whose residual gives the metric; null: the middle layer depth//2 - 1 (13 of 28, as released).
    cache_loc: Optional[List[int]] = None
    # t-attn | s-attn | ca-mlp
    cache_res: str = "t-attn"
    # Motion regularisation (MoReg) as released.
    moreg: bool = False
    # [first, last] 1-based steps; null: (4, 26) for 30 steps, (10, 90) for 100, scaled for others.
    moreg_window: Optional[List[int]] = None
    moreg_strides: List[int] = field(default_factory=lambda: [1])
    moreg_norm: float = 0.385
    moreg_power: float = 8.0
    moreg_div: float = 1.0
    mograd_mul: float = 10.0
    # false: the "MoReg without gradient" ablation.
    moreg_grad: bool = True
    # Debug: gather every rank's decision each computed step and fail loudly on any mismatch.
    verify_agreement: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.speed not in SPEEDS:
            out.append(f"cache.speed={self.speed!r} is not known; use {' or '.join(SPEEDS)}")
        if self.cache_res not in RESIDUALS:
            out.append(f"cache.cache_res={self.cache_res!r} is not known; use {', '.join(RESIDUALS)}")
        if self.codebook_steps is not None and (self.codebook_steps, self.speed) not in PUBLISHED:
            known = ", ".join(f"{n} ({s})" for n, s in PUBLISHED)
            out.append(f"cache.codebook_steps={self.codebook_steps} has no published {self.speed} codebook; use null "
                       f"or one of {known}")
        if (self.codebook_thresholds is None) != (self.codebook_rates is None):
            out.append("a custom codebook needs both cache.codebook_thresholds and cache.codebook_rates")
        elif self.codebook_thresholds is not None:
            th, rates = list(self.codebook_thresholds), list(self.codebook_rates)
            if len(rates) != len(th) + 1 or any(b <= a for a, b in zip(th, th[1:])) or min(rates) < 1:
                out.append("cache.codebook_rates needs one more rate (each >= 1) than cache.codebook_thresholds "
                           "(strictly increasing)")
        w = self.moreg_window
        if w is not None and (len(w) != 2 or not 1 <= w[0] <= w[1]):
            out.append(f"cache.moreg_window={list(w)} must be [first, last] 1-based steps with first <= last")
        if not self.moreg_strides or min(self.moreg_strides) < 1:
            out.append("cache.moreg_strides must be a non-empty list of frame strides >= 1")
        if self.cache_loc is not None and (not self.cache_loc or min(self.cache_loc) < 0):
            out.append("cache.cache_loc must be null or a non-empty list of layer indices >= 0")
        return out

    def build(self, comm=None) -> "AdaCache":
        return AdaCache(self, comm)


class AdaCache(AgreedPolicy):
    name = "adacache"

    def __init__(self, cfg: AdaCacheConfig, comm=None) -> None:
        cfg.check()
        self.site_keys: list[list[tuple]] = []  # per metric site: the branches whose outputs add up to it
        self.sites: list[str] = []
        self.layers: list[int] = []
        super().__init__(cfg, comm)

    # -- installation ----------------------------------------------------------------------------
    def install(self, model) -> None:
        depth = len(model.temporal_blocks)
        layers = list(self.cfg.cache_loc) if self.cfg.cache_loc else [max(depth // 2 - 1, 0)]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"cache.cache_loc={layers} has layers outside 0..{depth - 1} (the model has {depth} layers)")
        super().install(model)
        self.layers = layers
        sites = []
        for i in layers:
            if self.cfg.cache_res == "t-attn":
                sites.append([("temporal", i, "self")])
            elif self.cfg.cache_res == "s-attn":
                sites.append([("spatial", i, "self")])
            else:
                sites += [[(kind, i, "cross"), (kind, i, "mlp")] for kind in ("spatial", "temporal")]
        self.site_keys = sites
        names = {"self": "attn_delta", "cross": "cross_delta", "mlp": "mlp_delta"}
        self.sites = ["+".join(f"{k}_blocks.{i}.{names[slot]}" for k, i, slot in site) for site in sites]
        self.branches = Branches(model, [key for site in sites for key in site])
        self.reset()

    # -- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.rate = 1
        self.last = 0  # 1-based step of the last computation; 0: none yet
        self.codebook = None
        self.moreg = None
        self.moreg_prev: list[float] = []
        self.decisions = []
        self._delta = None  # fp32 x_out - x_in of the blocks stage
        self._prev = None  # metric residual per site

    def _configure(self, num_steps: int) -> None:
        c = self.cfg
        self.codebook = select_codebook(num_steps, c.speed, c.codebook_steps, c.codebook_thresholds, c.codebook_rates)
        self.moreg = None
        if c.moreg:
            self.moreg = MoRegParams(moreg_window(num_steps, c.moreg_window), tuple(c.moreg_strides), c.moreg_norm,
                                     c.moreg_power, c.moreg_div, c.mograd_mul, c.moreg_grad)
        self.moreg_prev = [1.0] * len(self.sites)

    # -- step checkpoints ------------------------------------------------------------------------
    checkpointable = True

    def will_compute(self, index: int) -> bool:
        """The schedule of `run`, known from the last decision before the step runs."""
        s = index + 1
        n = self.num_steps
        return index == 0 or s == self.last + self.rate or s in (n - 1, n)

    def state(self) -> dict:
        """The schedule position (rate, last), the decisions so far, the MoReg history, and as bands
        (B, T, S_r, C) with the tokens of a frame on dim 2: the whole-stack residual and the metric
        residual of every site. The codebook and MoReg constants follow from the config."""
        out = super().state()
        out["meta"].update(rate=self.rate, last=self.last, moreg_prev=list(self.moreg_prev),
                           decisions=[dict(vars(d)) for d in self.decisions])
        tensors = {} if self._delta is None else {"delta": self._delta}
        tensors.update({f"prev.{k}": p for k, p in enumerate(self._prev or [])})
        out["tensors"], out["bands"] = tensors, {name: 2 for name in tensors}
        return out

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        meta, tensors = state["meta"], state["tensors"]
        if self.num_steps is not None:
            self._configure(self.num_steps)
        self.rate, self.last, self.moreg_prev = meta["rate"], meta["last"], list(meta["moreg_prev"])
        self.decisions = [Decision(**d) for d in meta["decisions"]]
        self._delta = tensors.get("delta")
        prev = [tensors[f"prev.{k}"] for k in range(len(self.sites)) if f"prev.{k}" in tensors]
        self._prev = prev or None

    # -- the blocks stage ------------------------------------------------------------------------
    def run(self, e, step):
        n, s = step.num_steps, step.index + 1
        if step.index == 0:
            self._configure(n)
        compute = s == self.last + self.rate or s in (1, n - 1, n)
        self.computed[step.index] = compute
        if not compute:
            return add_residual(e.x, self._delta)
        self.branches.plan(keep=[key for site in self.site_keys for key in site])
        x_out = self.model.blocks(e)
        cur = [self._site_residual(site) for site in self.site_keys]
        self.branches.clear()
        if s == n:  # nothing after this step can use a decision or a cache: free everything
            self._delta = self._prev = None
        else:
            self._delta = fp32_residual(x_out, e.x)
            if self._prev is not None:
                self._decide(step.index, cur, getattr(e, "x_mask", None))  # stand-ins without one: all frames
            self._prev = cur
        self.last = s
        return x_out

    def _site_residual(self, keys):
        kept = self.branches.kept
        if any(k not in kept for k in keys):
            raise RuntimeError(f"AdaCache: no residual seen at {self.sites}; did the blocks run?")
        total = kept[keys[0]]
        for k in keys[1:]:
            total = total + kept[k]
        return total

    def _decide(self, index: int, cur, x_mask=None) -> None:
        s = index + 1
        # MoReg's frame pairs: the frames generated at this step in every row (None: all frames)
        frames = None if x_mask is None else x_mask.all(dim=0).cpu()
        local = torch.cat([site_sums(p, c, s, self.moreg, frames) for p, c in zip(self._prev, cur)])
        d, prev = decide(self.agree(local), index, self.rate, self.codebook, len(self.sites), self.moreg,
                         self.moreg_prev)
        self.verify(d.step, d.key(), lambda k: f"step {k[0]} rate_prev {k[1]} -> rate {k[2]} (c={k[3]})")
        self.decisions.append(d)
        self.rate, self.moreg_prev = d.rate, prev

    # -- report ----------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return tensor_bytes(self._delta, *(self._prev or []))

    def report(self) -> dict:
        rep = super().report()
        c = self.cfg
        rep.update({
            "speed": c.speed,
            "codebook": self.codebook.describe() if self.codebook else None,
            "sites": self.sites,
            "cache_res": c.cache_res,
            "cache_loc": self.layers,
            "moreg": None if self.moreg is None else {
                "window": list(self.moreg.window), "strides": list(self.moreg.strides), "norm": self.moreg.norm,
                "power": self.moreg.power, "div": self.moreg.div, "grad_mul": self.moreg.grad_mul,
                "use_grad": self.moreg.use_grad},
            "decisions": [json_safe(vars(d)) for d in self.decisions],
            "bytes_kept": "fp32 whole-stack residual + metric residual(s)",
            "agreement": self.agreement_report(),
        })
        return rep
