"""First-Block-Cache (ParaAttention / diffusers): run the first block, and when its residual has
barely changed since the last computed step, reuse the residual of the rest of the stack.

For STDiT3 the "first block" is layer 0: spatial block 0 and temporal block 0. Per step:

    h1 = layer0(x_emb); r1 = h1 - x_emb
    a reference exists and |r1 - r1_ref|_1 / |r1_ref|_1 < threshold: out = h1 + R_tail
    else: out = rest(h1); R_tail = out - h1 (fp32); r1_ref = r1

r1_ref changes only on computed steps, so drift is measured against the last refresh. No step is
forced to compute but the first (no reference); the default threshold is diffusers' 0.05.

Rank agreement: the two L1 sums over this rank's tokens in one float64 all-reduce
over the agreement group on every step with a reference; the comparison uses the reduced values,
identical on all ranks. A reused step still runs layer 0 and so, under a sequence-parallel layout,
layer 0's collectives (DSP: the two all-to-alls of its spatial attention), as every FBCache does.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.cache.base import AgreedPolicy, PolicyConfig, add_residual, block_sequence, fp32_residual, json_safe, run_blocks, tensor_bytes
from runner.cache.metric import l1_sums


@dataclass
class FBCacheConfig(PolicyConfig):
    """cache=fbcache."""

    name: str = "fbcache"
    # Reuse the tail residual while layer 0's residual changes less than this (relative L1 against
    # the last computed step; diffusers' default 0.05).
    fbcache_threshold: float = 0.05
    # Debug: gather every rank's decision each step and fail loudly on any mismatch.
    verify_agreement: bool = False

    def problems(self) -> list[str]:
        if not self.fbcache_threshold > 0:
            return [f"cache.fbcache_threshold={self.fbcache_threshold} must be > 0 (0 never reuses)"]
        return []

    def build(self, comm=None) -> "FBCache":
        return FBCache(self, comm)


class FBCache(AgreedPolicy):
    name = "fbcache"

    def __init__(self, cfg: FBCacheConfig, comm=None) -> None:
        cfg.check()
        self.threshold = float(cfg.fbcache_threshold)
        self.seq: list = []
        super().__init__(cfg, comm)

    def install(self, model) -> None:
        super().install(model)
        self.seq = block_sequence(model)

    def reset(self) -> None:
        super().reset()
        self.values: dict[int, float] = {}  # step -> relative L1 of the first block's residual
        self._ref = None  # r1 of the last computed step
        self._tail = None  # fp32 out - h1 of the last computed step

    def run(self, e, step):
        k, last = step.index, step.index == step.num_steps - 1
        h1 = run_blocks(self.seq[:2], e, e.x)
        r1 = (h1 - e.x).detach()
        compute = True
        if self._ref is not None:
            s = self.agree(l1_sums(self._ref, r1))  # [|r1 - r1_ref|, |r1_ref|]
            rel = s[0] / s[1] if s[1] else float("inf")
            self.values[k] = rel
            compute = not rel < self.threshold
            self.verify(k, (k, compute, float(rel).hex()),
                        lambda key: f"step {key[0]} compute={key[1]} rel={float.fromhex(key[2])}")
        self.computed[k] = compute
        if compute:
            out = run_blocks(self.seq[2:], e, h1)
            if not last:
                self._tail, self._ref = fp32_residual(out, h1), r1
        else:
            out = add_residual(h1, self._tail)
        return out

    def release(self) -> None:
        self._tail = self._ref = None

    # -- step checkpoints: the decision is taken inside a step, so every boundary may hold one (a
    # reused step runs layer 0's collectives and the decision's all-reduce anyway, and the store
    # check of the stop agreement is not a collective).
    checkpointable = True

    def state(self) -> dict:
        """The distances so far, and as bands (B, T, S_r, C): layer 0's residual and the tail
        residual of the last computed step."""
        out = super().state()
        out["meta"]["values"] = [[k, v] for k, v in sorted(self.values.items())]
        tensors = {name: t for name, t in (("ref", self._ref), ("tail", self._tail)) if t is not None}
        out["tensors"], out["bands"] = tensors, {name: 2 for name in tensors}
        return out

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.values = {int(k): float(v) for k, v in state["meta"]["values"]}
        self._ref, self._tail = state["tensors"].get("ref"), state["tensors"].get("tail")

    def bytes_held(self) -> int:
        return tensor_bytes(self._tail, self._ref)

    def report(self) -> dict:
        rep = super().report()
        rep.update({
            "threshold": self.threshold,
            "decisions": [json_safe({"step": k, "rel_l1": v, "reused": not self.computed[k]})
                          for k, v in sorted(self.values.items())],
            "bytes_kept": "fp32 tail residual (layers 1..) + layer 0's residual of the last computed step",
            "agreement": self.agreement_report(),
        })
        return rep
