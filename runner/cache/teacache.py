"""TeaCache (arXiv 2411.19108) for Open-Sora 1.2: whole-stack residual reuse gated by the
accumulated, polynomially rescaled relative L1 change of block 0's timestep-modulated input.

Per step k (0-based, T steps), with F_k = modulate(norm1(x_emb), shift_msa, scale_msa) of
spatial block 0 (its scale_shift_table + the step's t_mlp) over the whole batch (both CFG halves):

    k == 0 or k == T-1: compute, acc = 0
    else: acc += poly(|F_k - F_{k-1}|_1 / |F_{k-1}|_1); acc < delta: reuse, else compute and acc = 0
    F_prev = F_k (every step)

poly: np.poly1d-style coefficients, highest power first (the Open-Sora 1.2 fit by default);
delta: 0.1 (slow) or 0.2 (fast), or `teacache_thresh`. A reused step returns x_emb + R with R the
fp32 blocks-stage residual of the last computed step; embed and final layer run every step.

Rank agreement: the two L1 sums over this rank's tokens go into one float64
all-reduce over the agreement group on every step 1..T-2, so the relative L1 is the global one
(the mean ratio of the reference: both means count the same elements) and bit-identical on all
ranks; the accumulator is a pure function of those values. With CFG-parallel the sums span both
halves, as the reference's batched [cond; uncond] forward does. F_k costs one LayerNorm and one
modulation of the embedded shard per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from models.layers import modulate
from runner.cache.base import AgreedPolicy, PolicyConfig, add_residual, fp32_residual, json_safe, tensor_bytes
from runner.cache.metric import l1_sums

# Open-Sora 1.2's rescaling polynomial (TeaCache eval/teacache/experiments/opensora.py), highest power first.
OPENSORA_COEFFICIENTS = (2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02)
THRESHOLDS = {"slow": 0.1, "fast": 0.2}


def poly(coefficients, x: float) -> float:
    """np.poly1d(coefficients)(x): highest power first (Horner)."""
    acc = 0.0
    for c in coefficients:
        acc = acc * x + c
    return acc


def modulated_input(block, e) -> torch.Tensor:
    """The timestep-modulated input of `block` (its self-attention's input) for the embedded tokens."""
    shift, scale = block.modulation(e.t_mlp)[:2]  # per frame when an x_mask gives some frames
    return modulate(block.norm1(e.x), shift, scale)


class Accumulator:
    """The TeaCache rule on host floats: `step(k, n, rel)` -> compute? (rel: None on steps 0, n-1)."""

    def __init__(self, delta: float, coefficients) -> None:
        self.delta, self.coefficients, self.acc = delta, tuple(coefficients), 0.0

    def step(self, k: int, n: int, rel: float | None) -> tuple[bool, float | None]:
        """(compute, rescaled distance) for step k of n; resets the accumulator when computing."""
        rescaled = None
        if k == 0 or k == n - 1:
            compute = True
        else:
            rescaled = poly(self.coefficients, rel)
            self.acc += rescaled
            # an undefined distance (|F_prev| = 0: rel = inf) or a non-finite rescaling computes
            compute = not (math.isfinite(self.acc) and self.acc < self.delta)
        if compute:
            self.acc = 0.0
        return compute, rescaled


@dataclass
class TeaCacheConfig(PolicyConfig):
    """cache=teacache, teacache-slow."""

    name: str = "teacache"
    # fast | slow: the published Open-Sora thresholds delta 0.2 | 0.1.
    speed: str = "fast"
    # delta itself; null: from speed.
    teacache_thresh: Optional[float] = None
    # The rescaling polynomial, highest power first (default: the published Open-Sora 1.2 fit).
    teacache_coefficients: List[float] = field(default_factory=lambda: list(OPENSORA_COEFFICIENTS))
    # Debug: gather every rank's decision each step and fail loudly on any mismatch.
    verify_agreement: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.speed not in THRESHOLDS:
            out.append(f"cache.speed={self.speed!r} is not known; TeaCache knows slow (delta 0.1) and fast (0.2)")
        if self.teacache_thresh is not None and not self.teacache_thresh > 0:
            out.append(f"cache.teacache_thresh={self.teacache_thresh} must be > 0 (or null: 0.1 slow, 0.2 fast)")
        if not self.teacache_coefficients:
            out.append("cache.teacache_coefficients must hold at least one coefficient")
        return out

    def build(self, comm=None) -> "TeaCache":
        return TeaCache(self, comm)


class TeaCache(AgreedPolicy):
    name = "teacache"

    def __init__(self, cfg: TeaCacheConfig, comm=None) -> None:
        cfg.check()
        self.delta = float(cfg.teacache_thresh if cfg.teacache_thresh is not None else THRESHOLDS[cfg.speed])
        self.coefficients = tuple(float(c) for c in cfg.teacache_coefficients)
        super().__init__(cfg, comm)

    def reset(self) -> None:
        super().reset()
        self.rule = Accumulator(self.delta, self.coefficients)
        self.values: dict[int, dict] = {}  # step -> rel_l1, rescaled, acc (decided steps)
        self._prev_inp = None
        self._residual = None

    def run(self, e, step):
        k, n = step.index, step.num_steps
        inp = modulated_input(self.model.spatial_blocks[0], e)
        rel = None
        if 0 < k < n - 1:
            s = self.agree(l1_sums(self._prev_inp, inp))  # [|F_k - F_prev|, |F_prev|]
            rel = s[0] / s[1] if s[1] else float("inf")
        acc = self.rule.acc
        compute, rescaled = self.rule.step(k, n, rel)
        if rel is not None:
            self.values[k] = {"rel_l1": rel, "rescaled": rescaled, "acc": acc + rescaled}
            self.verify(k, (k, compute, float(rel).hex()),
                        lambda key: f"step {key[0]} compute={key[1]} rel={float.fromhex(key[2])}")
        self.computed[k] = compute
        last = k == n - 1
        self._prev_inp = None if last else inp.detach()
        if compute:
            x_out = self.model.blocks(e)
            self._residual = None if last else fp32_residual(x_out, e.x)
        else:
            x_out = add_residual(e.x, self._residual)
        return x_out

    # -- step checkpoints: decided inside the step, like FBCache (runner/cache/fbcache.py)
    checkpointable = True

    def state(self) -> dict:
        """The accumulated distance and the decisions so far, and as bands (B, T, S_r, C): block 0's
        modulated input of the previous step and the whole-stack residual of the last computed one."""
        out = super().state()
        out["meta"].update(acc=self.rule.acc, values=[[k, v] for k, v in sorted(self.values.items())])
        tensors = {name: t for name, t in (("prev_inp", self._prev_inp), ("residual", self._residual))
                   if t is not None}
        out["tensors"], out["bands"] = tensors, {name: 2 for name in tensors}
        return out

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.rule.acc = float(state["meta"]["acc"])
        self.values = {int(k): dict(v) for k, v in state["meta"]["values"]}
        self._prev_inp, self._residual = state["tensors"].get("prev_inp"), state["tensors"].get("residual")

    def bytes_held(self) -> int:
        return tensor_bytes(self._residual, self._prev_inp)

    def report(self) -> dict:
        rep = super().report()
        rep.update({
            "delta": self.delta, "coefficients": list(self.coefficients),
            "decisions": [json_safe({"step": k, **v}) for k, v in sorted(self.values.items())],
            "bytes_kept": "fp32 whole-stack residual + block 0's modulated input of the previous step",
            "agreement": self.agreement_report(),
        })
        return rep
