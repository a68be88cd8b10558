"""The cache-policy interface.

A policy is installed on a built (and possibly parallelized) STDiT3 from outside: it may wrap the
model's stages on the instance and register forward hooks on the residual taps; the model files
know nothing about it. It keeps all of its state itself, is reset at the start of every generation
and is told each step by the sampler (`begin_step(info)`; `wrap_model_fn` does that around a
model_fn). `report()` is a JSON-able dict: the computed/reused pattern per step, the decision
values per computed step and the bytes it holds.

Order of wrappers (DESIGN principle 2): layout first, policy second, so that a reused stage never
enters a wrapped collective.
"""

from __future__ import annotations

import math

import torch


class CachePolicy:
    name = "base"

    def __init__(self) -> None:
        self.model = None
        self.num_steps: int | None = None
        self.computed: dict[int, bool] = {}  # 0-based step -> computed (True) / reused (False)
        self.index: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def install(self, model) -> None:
        if self.model is not None:
            raise RuntimeError(f"cache policy {self.name!r} is already installed on a model")
        self.model = model

    def uninstall(self) -> None:
        self.model = None

    def reset(self) -> None:
        """Forget everything of the previous generation."""
        self.num_steps = None
        self.computed = {}
        self.index = None

    def begin_step(self, info) -> None:
        """info: runner.sampler.StepInfo (index 0-based, num_steps). Index 0 starts a generation."""
        if info.index == 0:
            self.reset()
            self.num_steps = info.num_steps
        elif self.index is None or info.index not in (self.index, self.index + 1):
            raise RuntimeError(f"cache policy {self.name!r}: step {info.index} follows step {self.index}; "
                               "steps must be announced in order starting at 0")
        if info.index != self.index:
            self.index = info.index
            self.computed[info.index] = self.decide_compute(info)

    def decide_compute(self, info) -> bool:
        return True

    def wrap_model_fn(self, fn):
        """model_fn(z, t, info) that announces the step before calling fn."""

        def model_fn(z_in, t_in, info):
            self.begin_step(info)
            return fn(z_in, t_in, info)

        return model_fn

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
            "bytes_held_peak": 0,
        }

    def computed_fraction(self) -> float | None:
        """The fraction of the block stack's work this generation computed (whole-stack policies:
        computed steps / steps; span and module policies count blocks or modules)."""
        return sum(self.computed.values()) / len(self.computed) if self.computed else None


class NoCache(CachePolicy):
    """cache=none: every step computes everything."""

    name = "none"


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

    def __init__(self, cfg, comm=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.comm = comm
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

    def agreement_report(self) -> dict:
        return {"group": "agree", "size": 1 if self.comm is None else self.comm.size("agree"),
                "decision_all_reduces": self.all_reduces, "verified": bool(self.cfg.verify_agreement)}


class BlocksStagePolicy(AgreedPolicy):
    """A policy that replaces the model's blocks stage (`model.blocks(e)`) on the instance.

    `run_stage(e)` does the policy's work for the current step; the wrapper runs the plain stage
    outside a generation (no step announced) and fails when the DiT is called twice in one step.
    Blocks are called as modules, so a layout's hooks (and collectives) run exactly for the blocks
    that run. Subclasses call `arm()` from decide_compute and `disarm()` after the last step.
    """

    def __init__(self, cfg, comm=None) -> None:
        super().__init__(cfg, comm)
        self._orig_blocks = None
        self._had_instance_blocks = False
        self._active = False
        self._calls = 0
        self._peak = 0

    def install(self, model) -> None:
        super().install(model)
        self._had_instance_blocks = "blocks" in model.__dict__
        self._orig_blocks = model.blocks
        model.blocks = self._blocks

    def uninstall(self) -> None:
        if self.model is None:
            return
        if self._had_instance_blocks:
            self.model.blocks = self._orig_blocks
        else:
            del self.model.blocks
        self._orig_blocks = None
        self.reset()
        super().uninstall()

    def reset(self) -> None:
        super().reset()
        self.all_reduces = 0
        self._active = False
        self._calls = 0
        self._peak = 0

    def arm(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.name}: begin_step before install(model)")
        self._calls = 0
        self._active = True

    def disarm(self) -> None:
        self._active = False

    def note_memory(self) -> None:
        self._peak = max(self._peak, self.bytes_held())

    def _blocks(self, e):
        if not self._active:  # outside a generation (no step announced): plain model
            return self._orig_blocks(e)
        if self._calls:
            raise RuntimeError(f"{self.name}: the DiT was called twice in step {self.index}; the sampler must make "
                               "one model call per step (announce each step with begin_step)")
        self._calls += 1
        return self.run_stage(e)

    def run_stage(self, e):
        raise NotImplementedError

    def report(self) -> dict:
        rep = super().report()
        rep["bytes_held_peak"] = self._peak
        return rep
