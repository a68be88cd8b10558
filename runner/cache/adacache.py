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

The residual is added in fp32 and rounded once to the model dtype; a per-block bf16 cache rounds
after every block. The decision needs one host sync per computed step (`tolist`), none on reused steps.
"""

from __future__ import annotations

import torch

from runner.cache.base import (
    BlocksStagePolicy, CacheAgreementError, add_residual, fp32_residual, json_safe, tensor_bytes,
)
from runner.cache.codebook import moreg_window, select_codebook
from runner.cache.metric import MoRegParams, decide, site_sums

RESIDUALS = ("t-attn", "s-attn", "ca-mlp")


__all__ = ["AdaCache", "CacheAgreementError", "RESIDUALS"]


class AdaCache(BlocksStagePolicy):
    name = "adacache"

    def __init__(self, cfg, comm=None) -> None:
        if cfg.cache_res not in RESIDUALS:
            raise ValueError(f"cache.cache_res={cfg.cache_res!r} is not known; use one of {', '.join(RESIDUALS)}")
        super().__init__(cfg, comm)
        self._hooks = []
        self.sites: list[str] = []
        self.layers: list[int] = []
        self.reset()

    # -- installation ----------------------------------------------------------------------------
    def install(self, model) -> None:
        depth = len(model.temporal_blocks)
        layers = list(self.cfg.cache_loc) if self.cfg.cache_loc else [max(depth // 2 - 1, 0)]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"cache.cache_loc={layers} has layers outside 0..{depth - 1} (the model has {depth} layers)")
        super().install(model)
        self.layers = layers
        taps = []  # per site: the tap modules whose outputs add up to the site's residual
        for i in layers:
            sb, tb = model.spatial_blocks[i], model.temporal_blocks[i]
            if self.cfg.cache_res == "t-attn":
                taps.append([(f"temporal_blocks.{i}.attn_delta", tb.attn_delta)])
            elif self.cfg.cache_res == "s-attn":
                taps.append([(f"spatial_blocks.{i}.attn_delta", sb.attn_delta)])
            else:
                for kind, blk in (("spatial", sb), ("temporal", tb)):
                    taps.append([(f"{kind}_blocks.{i}.cross_delta", blk.cross_delta),
                                 (f"{kind}_blocks.{i}.mlp_delta", blk.mlp_delta)])
        self.sites = ["+".join(name for name, _ in site) for site in taps]
        for k, site in enumerate(taps):
            for _, mod in site:
                self._hooks.append(mod.register_forward_hook(self._make_hook(k)))
        self.reset()

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        super().uninstall()

    def _make_hook(self, k: int):
        def hook(module, inputs, output):
            if self._collect:
                acc = self._cur[k]
                self._cur[k] = output.detach() if acc is None else acc + output.detach()

        return hook

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
        self._cur = None
        self._collect = False

    def _configure(self, num_steps: int) -> None:
        c = self.cfg
        self.codebook = select_codebook(num_steps, c.speed, c.codebook_steps, c.codebook_thresholds, c.codebook_rates)
        self.moreg = None
        if c.moreg:
            self.moreg = MoRegParams(moreg_window(num_steps, c.moreg_window), tuple(c.moreg_strides), c.moreg_norm,
                                     c.moreg_power, c.moreg_div, c.mograd_mul, c.moreg_grad)
        self.moreg_prev = [1.0] * len(self.sites)

    def decide_compute(self, info) -> bool:
        self.arm()
        if info.index == 0:
            self._configure(info.num_steps)
        n, s = info.num_steps, info.index + 1
        return s == self.last + self.rate or s in (1, n - 1, n)

    # -- the blocks stage ------------------------------------------------------------------------
    def run_stage(self, e):
        if not self.computed[self.index]:
            return add_residual(e.x, self._delta)
        self._cur = [None] * len(self.sites)
        self._collect = True
        try:
            x_out = self._orig_blocks(e)
        finally:
            self._collect = False
        self._after_compute(e, x_out)
        return x_out

    def _after_compute(self, e, x_out) -> None:
        index, n = self.index, self.num_steps
        s = index + 1
        final = s == n
        if any(r is None for r in self._cur):
            raise RuntimeError(f"AdaCache: no residual seen at {self.sites}; was the model's block stage replaced?")
        if final:  # nothing after this step can use a decision or a cache: free everything
            self._delta = self._prev = self._cur = None
            self.disarm()
        else:
            self._delta = fp32_residual(x_out, e.x)
            if self._prev is not None:
                self._decide(index)
            self._prev, self._cur = self._cur, None
            self.note_memory()
        self.last = s

    def _decide(self, index: int) -> None:
        s = index + 1
        local = torch.cat([site_sums(p, c, s, self.moreg) for p, c in zip(self._prev, self._cur)])
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
