"""The cache-policy interface: the blocks stage of the forward, with the step passed explicitly.

One model call of the sampler reads, top to bottom (`forward` below, which the job runs):

    e = dit.embed(x, t, y, mask, ...)          # patchify, positions, timestep and caption
    h = policy.blocks(e, step)                 # the policy decides, then runs or reuses the blocks
    out = dit.final(h, e)                      # final layer

`policy.blocks(e, step)` is the one entry point: `step` (runner.sampler.StepInfo: index, num_steps,
timestep) comes from the sampler, index 0 starts a generation, and every later call must be the
next step (one model call per step). A policy decides there, from the step and, for the
content-adaptive ones, from this step's values, and either calls the model's own blocks
(`model.blocks(e)`, or a span of `block_sequence`) or adds what it kept. Module-level reuse inside
the blocks goes through runner/cache/branches.py. A policy keeps all of its state itself, is
installed once on the built (and parallelized) model by the assembly (runner/assemble.py), and
reports per step what it computed (`report()`: a JSON-able dict).

Order of wrappers (DESIGN principle 2): layout first, policy second, so that a reused stage never
enters a wrapped collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def forward(dit, policy: "CachePolicy", step, x, t, y, mask=None, **kwargs) -> torch.Tensor:
    """One model call: embed, the policy's blocks stage for `step`, final layer."""
    e = dit.embed(x, t, y, mask, **kwargs)
    return dit.final(policy.blocks(e, step), e)


class CachePolicy:
    name = "base"

    def __init__(self, cfg=None, comm=None) -> None:
        self.cfg, self.comm = cfg, comm
        self.model = None
        self.branches = None  # runner/cache/branches.py, for policies that reach into the blocks
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------------
    def install(self, model) -> None:
        """Once, by the assembly, after the parallel layout."""
        if self.model is not None:
            raise RuntimeError(f"cache policy {self.name!r} is already installed on a model")
        self.model = model

    def uninstall(self) -> None:
        if self.branches is not None:
            self.branches.remove()
            self.branches = None
        self.model = None
        self.reset()

    def reset(self) -> None:
        """Forget everything of the previous generation."""
        self.num_steps: int | None = None
        self.computed: dict[int, bool] = {}  # 0-based step -> computed everything (True) / reused something
        self.index: int | None = None
        self._peak = 0

    # -- the blocks stage ------------------------------------------------------------------------
    def blocks(self, e, step) -> torch.Tensor:
        """The blocks stage of `step` on the embedded tokens e: decide, then run or reuse."""
        if self.model is None:
            raise RuntimeError(f"cache policy {self.name!r}: blocks() before install(model)")
        if step.index == 0 and self.index == 0:
            raise RuntimeError(f"cache policy {self.name!r}: step 0 follows step 0; the sampler must make one model "
                               "call per step")
        if step.index == 0:  # a new generation (also after one that ended early)
            self.reset()
            self.num_steps = step.num_steps
        elif self.index is None or step.index != self.index + 1:
            raise RuntimeError(f"cache policy {self.name!r}: step {step.index} follows step {self.index}; the "
                               "sampler must make one model call per step, in order from step 0")
        self.index = step.index
        out = self.run(e, step)
        self._peak = max(self._peak, self.bytes_held())
        if step.index == step.num_steps - 1:
            self.release()
            self.index = None  # the generation is over: the next call must be a step 0
        return out

    def will_compute(self, index: int) -> bool:
        """Whether step `index` (the next one) will run the whole block stack, known before it runs.
        A policy that decides inside the step (from the step's values) says True; a scheduled one
        knows. Step checkpoints and the stop agreement happen only before such steps, so a reused
        step stays free of communication (runner/checkpoint.py)."""
        return True

    def run(self, e, step) -> torch.Tensor:
        """The policy's work for one step; sets self.computed[step.index]."""
        self.computed[step.index] = True
        return self.model.blocks(e)

    def release(self) -> None:
        """After the last step: drop what nothing can use any more."""

    # -- step checkpoints (runner/checkpoint.py) -------------------------------------------------
    # Whether state() and load_state() are implemented; policies without them run without
    # checkpoints (a stop signal then ends the run as before, from the last video written).
    checkpointable = False

    def state(self) -> dict:
        """What the policy holds at a step boundary, for a checkpoint:
        {"meta": plain values, "tensors": {name: tensor}, "bands": {name: dim}}. A tensor named in
        "bands" is this rank's share of a token grid: dim 0 is the model batch (the CFG pair
        [cond; uncond], which CFG-parallel splits) and `dim` the tokens of a frame, sharded by whole
        patch rows; the checkpoint re-splits such tensors for another layout. The others are the
        same on every rank of the group."""
        if not self.checkpointable:
            raise NotImplementedError(f"cache policy {self.name!r} has no checkpoint support")
        return {"meta": {"num_steps": self.num_steps, "index": self.index,
                         "computed": [[i, c] for i, c in sorted(self.computed.items())]},
                "tensors": {}, "bands": {}}

    def load_state(self, state: dict) -> None:
        """Continue from `state()` (with band tensors already re-split for this rank): the next
        blocks() call is the step after the saved index."""
        if not self.checkpointable:
            raise NotImplementedError(f"cache policy {self.name!r} has no checkpoint support")
        meta = state["meta"]
        self.reset()
        self.num_steps, self.index = meta["num_steps"], meta["index"]
        self.computed = {int(i): bool(c) for i, c in meta["computed"]}

    # -- report ----------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return 0

    def report(self) -> dict:
        steps = sorted(self.computed)
        return {
            "policy": self.name,
            "num_steps": self.num_steps,
            "pattern": "".join("C" if self.computed[i] else "R" for i in steps),
            "computed_steps": [i for i in steps if self.computed[i]],
            "num_computed": sum(self.computed.values()),
            "computed_fraction": self.computed_fraction(),
            "bytes_held": self.bytes_held(),
            "bytes_held_peak": self._peak,
        }

    def computed_fraction(self) -> float | None:
        """The fraction of the block stack's work this generation computed (whole-stack policies:
        computed steps / steps; span and module policies count blocks or modules)."""
        return sum(self.computed.values()) / len(self.computed) if self.computed else None


class PolicyConfig:
    """What every policy's typed config (a dataclass registered in Hydra's `cache` group,
    runner/config.py) offers: its problems, checked once (`validate` at start-up, and `check` when a
    policy is built from code), and the policy it builds."""

    def problems(self) -> list[str]:
        return []

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def build(self, comm=None) -> "CachePolicy":
        raise NotImplementedError


@dataclass
class NoCacheConfig(PolicyConfig):
    """cache=none."""

    name: str = "none"

    def build(self, comm=None) -> "NoCache":
        return NoCache(self, comm)


class NoCache(CachePolicy):
    """cache=none: every step computes everything."""

    name = "none"
    checkpointable = True


def json_safe(v):
    """inf/nan -> strings, so the report is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


class CacheAgreementError(RuntimeError):
    """Ranks of one agreement group reached different cache decisions."""


def block_sequence(model) -> list:
    """The model's blocks in execution order: spatial 0, temporal 0, spatial 1, ... (56 for Open-Sora)."""
    seq = []
    for spatial, temporal in zip(model.spatial_blocks, model.temporal_blocks):
        seq += [spatial, temporal]
    return seq


def run_blocks(blocks, e, x):
    """Run blocks (a slice of `block_sequence`) on x with the step's conditioning in e."""
    for blk in blocks:
        x = blk(x, e.y, e.y_mask, e.t_mlp)
    return x


def add_residual(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x + r for a cached fp32 residual r: added in fp32, rounded once to x's dtype."""
    return (x.float() + r).to(x.dtype)


def fp32_residual(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out - x in fp32, detached: what a residual cache keeps."""
    return (out.float() - x.float()).detach()


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class AgreedPolicy(CachePolicy):
    """A policy whose content-adaptive decision is a pure function of globally reduced partial sums:
    one SUM all-reduce of a float64 tensor over the agreement group (cfg x sp of one prompt) per
    decision (`agree`), and, with `verify_agreement`, a gather of every rank's decision key that
    raises `CacheAgreementError` on any mismatch instead of letting the ranks hang."""

    def reset(self) -> None:
        super().reset()
        self.all_reduces = 0

    def agree(self, local: torch.Tensor, tag: str = "cache-decision") -> list[float]:
        if self.comm is not None:
            self.comm.all_reduce(local, group="agree", op="sum", tag=tag)
        self.all_reduces += 1
        return local.tolist()

    def verify(self, step: int, key: tuple, describe) -> None:
        """key: what must be identical on every rank; describe(key) -> text for the error."""
        if not (self.cfg.verify_agreement and self.comm is not None):
            return
        keys = self.comm.all_gather_object(key, group="agree", tag="cache-verify")
        if any(k != keys[0] for k in keys):
            lines = "; ".join(f"agree rank {r}: {describe(k)}" for r, k in enumerate(keys))
            raise CacheAgreementError(f"{type(self).__name__} decisions diverged at step {step} across the agreement "
                                      f"group ({lines}); the ranks would run different collectives and hang")

    def state(self) -> dict:
        out = super().state()
        out["meta"]["all_reduces"] = self.all_reduces
        return out

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.all_reduces = state["meta"]["all_reduces"]

    def agreement_report(self) -> dict:
        return {"group": "agree", "size": 1 if self.comm is None else self.comm.size("agree"),
                "decision_all_reduces": self.all_reduces, "verified": bool(self.cfg.verify_agreement)}
