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
            "bytes_held": self.bytes_held(),
            "bytes_held_peak": 0,
        }


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
