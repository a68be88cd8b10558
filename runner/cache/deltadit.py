"""Delta-DiT (arXiv 2406.01125): Delta-Cache over a contiguous span of blocks, stage-adaptive.

Blocks are counted in execution order over both kinds (Open-Sora 1.2: 28 layers -> 56 blocks:
spatial 0, temporal 0, spatial 1, ...). A span S = [I, I + N_c).

- Refresh step: run everything; keep Delta = h_out - h_in (fp32), h_in entering block I and h_out
  leaving block I + N_c - 1.
- Cached step: run the blocks before I with the step's own timestep and conditioning, add Delta
  in place of the span (rounded once to the model dtype), run the blocks after it normally.

Rule "paper" (reference cache_methods.md 2.3-2.4, 2.8): during the first b steps (outline stage)
the span is at the rear, I = N_b - N_c; afterwards at the front, I = I_front (0 by default).
Refresh at k % N == 0 and whenever the span differs from the one Delta was taken on (the switch
at b forces a refresh). N and N_c come from a target speed-up s over block MACs (`budget`):
N = ceil(s), N_c = ceil(N / (N - 1) * (N_b - N_b / s)) -- 1.6x over 28 blocks gives N = 2,
N_c = 21 -- or are set directly. b defaults to round(0.6 T), the paper's b = 12 of 20 steps.

Rule "port" (the PAB authors' Open-Sora port, reference 2.7): steps k in [k_lo, k_hi] with
(k - k_lo + 1) % gap == 0 skip ST-layers l_s..l_e (blocks 2 l_s .. 2 l_e + 1); every other step
refreshes. Open-Sora: steps 0..5, layers 0..5, gap 2 -> steps 1, 3, 5 skip 12 of 56 blocks. The
port adds h_in - h_out, the negative of Delta (a likely sign error); `deltadit_negate` reproduces it.

The schedule is a pure function of the step index: no agreement traffic. A skipped span's blocks
are not called, so under a layout their collectives do not run either. Step checkpoints land
before refresh steps (which take Delta anew), so they hold no tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from runner.cache.base import CachePolicy, PolicyConfig, add_residual, block_sequence, run_blocks, tensor_bytes

RULES = ("paper", "port")


def budget(speedup: float, n_blocks: int) -> tuple[int, int]:
    """(N, N_c) for a target speed-up over block MACs (reference 2.4, closed form of the budget
    equation (T/N)(N_b + (N-1)(N_b - N_c)) M_b = M_g with M_g = T N_b M_b / speedup)."""
    if not speedup > 1:
        raise ValueError(f"cache.deltadit_speedup={speedup} must be > 1")
    n = math.ceil(round(speedup, 9))  # rounding: 1.6 must not become 1.6000000000000001 -> ceil 3
    nc = math.ceil(round(n / (n - 1) * (n_blocks - n_blocks / speedup), 9))
    return n, min(nc, n_blocks)


def paper_plan(num_steps: int, n_blocks: int, interval: int, span: int, b: int, front_start: int = 0):
    """Per step: ((first block, end block), refresh?) under the stage-adaptive rule."""
    rear, front = (n_blocks - span, n_blocks), (front_start, front_start + span)
    plan, taken = [], None
    for k in range(num_steps):
        s = rear if k < b else front
        refresh = k % interval == 0 or s != taken
        taken = s if refresh else taken
        plan.append((s, refresh))
    return plan


def port_plan(num_steps: int, steps, layers, gap: int):
    """Per step: ((first block, end block), refresh?) as the PAB authors' port schedules it."""
    s = (2 * layers[0], 2 * layers[1] + 2)
    plan, have = [], False
    for k in range(num_steps):
        cached = have and steps[0] <= k <= steps[1] and (k - steps[0] + 1) % gap == 0
        have = True
        plan.append((s, not cached))
    return plan


@dataclass
class DeltaDiTConfig(PolicyConfig):
    """cache=deltadit, deltadit-port. Blocks are counted over both kinds (56 for Open-Sora:
    spatial 0, temporal 0, spatial 1, ...)."""

    name: str = "deltadit"
    # paper: rear span for the first b steps, front span after, refresh every N steps and at the switch.
    # port: the PAB authors' Open-Sora port (deltadit_port_*).
    deltadit_rule: str = "paper"
    # Target speed-up over block MACs; gives N = ceil(s) and N_c = ceil(N/(N-1) (N_b - N_b/s)).
    deltadit_speedup: float = 1.6
    # N (refresh period) and N_c (span length in blocks) directly; both or neither (then the speed-up).
    deltadit_interval: Optional[int] = None
    deltadit_span: Optional[int] = None
    # Outline-stage steps that use the rear span; null: round(0.6 * steps) (the paper's 12 of 20).
    deltadit_b: Optional[int] = None
    # I_front, the first block of the front span (the rear span ends at the last block).
    deltadit_front_start: int = 0
    # port: steps [first, last] in which every gap-th step (counted from first, 1-based) skips the
    # ST-layers [first, last] (both kinds of block); all other steps refresh.
    deltadit_port_steps: List[int] = field(default_factory=lambda: [0, 5])
    deltadit_port_layers: List[int] = field(default_factory=lambda: [0, 5])
    deltadit_port_gap: int = 2
    # Add h_in - h_out instead of h_out - h_in: the port's sign (a likely bug), to reproduce its numbers.
    deltadit_negate: bool = False

    def problems(self) -> list[str]:
        out = []
        if self.deltadit_rule not in RULES:
            out.append(f"cache.deltadit_rule={self.deltadit_rule!r} is not known; use {' or '.join(RULES)}")
        if (self.deltadit_interval is None) != (self.deltadit_span is None):
            out.append("set both cache.deltadit_interval (N) and cache.deltadit_span (N_c), or neither (then "
                       "cache.deltadit_speedup gives them)")
        elif self.deltadit_span is None and not self.deltadit_speedup > 1:
            out.append(f"cache.deltadit_speedup={self.deltadit_speedup} must be > 1")
        return out

    def build(self, comm=None) -> "DeltaDiT":
        return DeltaDiT(self, comm)


class DeltaDiT(CachePolicy):
    name = "deltadit"

    def __init__(self, cfg: DeltaDiTConfig, comm=None) -> None:
        cfg.check()
        self.seq: list = []
        self.port_layers = None
        super().__init__(cfg, comm)

    def install(self, model) -> None:
        seq = block_sequence(model)
        self.interval, self.span = self._sizes(len(seq))
        super().install(model)
        self.seq = seq

    def _sizes(self, n_blocks: int) -> tuple[int, int]:
        c = self.cfg
        if c.deltadit_rule == "port":
            lo, hi = c.deltadit_port_layers
            if not (0 <= lo <= hi and lo < n_blocks // 2 and c.deltadit_port_gap >= 1):
                raise ValueError(f"cache.deltadit_port_layers={list(c.deltadit_port_layers)} must be layers "
                                 f"0 <= first <= last with first < {n_blocks // 2}, deltadit_port_gap >= 1")
            # Open-Sora's layers 0..5 on a shallower model (the demo has 4): up to its last layer (reported).
            self.port_layers = [lo, min(hi, n_blocks // 2 - 1)]
            return c.deltadit_port_gap, 2 * (self.port_layers[1] - lo + 1)
        n, nc = (c.deltadit_interval, c.deltadit_span) if c.deltadit_span is not None else budget(c.deltadit_speedup,
                                                                                                     n_blocks)
        if not (n >= 1 and 1 <= nc and c.deltadit_front_start >= 0 and c.deltadit_front_start + nc <= n_blocks):
            raise ValueError(f"Delta-DiT: N={n}, N_c={nc}, front start {c.deltadit_front_start} do not fit the "
                             f"model's {n_blocks} blocks (need N >= 1, 1 <= N_c, start + N_c <= {n_blocks})")
        return n, nc

    def reset(self) -> None:
        super().reset()
        self.plan = None
        self.b = None
        self._delta = None

    def _plan(self, num_steps: int):
        c = self.cfg
        if c.deltadit_rule == "port":
            return port_plan(num_steps, c.deltadit_port_steps, self.port_layers, c.deltadit_port_gap)
        self.b = c.deltadit_b if c.deltadit_b is not None else round(0.6 * num_steps)
        return paper_plan(num_steps, len(self.seq), self.interval, self.span, self.b, c.deltadit_front_start)

    def run(self, e, step):
        k = step.index
        if k == 0:
            self.plan = self._plan(step.num_steps)
        (lo, hi), refresh = self.plan[k]
        self.computed[k] = refresh
        x = run_blocks(self.seq[:lo], e, e.x)
        if refresh:
            h_in = x
            x = run_blocks(self.seq[lo:hi], e, x)
            needed = any(not r for _, r in self.plan[k + 1:])
            d = (h_in.float() - x.float()) if self.cfg.deltadit_negate else (x.float() - h_in.float())
            self._delta = d.detach() if needed else None
        else:
            x = add_residual(x, self._delta)
        return run_blocks(self.seq[hi:], e, x)

    def release(self) -> None:
        self._delta = None

    # -- step checkpoints: the schedule is fixed, so only refresh steps are stop boundaries (a cached
    # step stays free of communication). A refresh step takes Delta anew, so the state is the
    # schedule's position alone (the base's), no tensor.
    checkpointable = True

    def will_compute(self, index: int) -> bool:
        return self.plan is None or self.plan[index][1]  # no plan yet: step 0, which refreshes

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.plan = None if self.num_steps is None else self._plan(self.num_steps)  # None: before step 0

    def blocks_run(self) -> list[int]:
        """Blocks called per announced step."""
        n = len(self.seq)
        return [n if self.plan[k][1] else n - (self.plan[k][0][1] - self.plan[k][0][0]) for k in sorted(self.computed)]

    def computed_fraction(self) -> float | None:
        run = self.blocks_run()
        return sum(run) / (len(run) * len(self.seq)) if run else None

    def bytes_held(self) -> int:
        return tensor_bytes(self._delta)

    def report(self) -> dict:
        rep = super().report()
        steps = sorted(self.computed)
        c = self.cfg
        rep.update({
            "rule": c.deltadit_rule, "n_blocks": len(self.seq), "interval": self.interval, "span": self.span,
            "b": self.b, "negate": bool(c.deltadit_negate), "port_layers": self.port_layers,
            "spans": [list(self.plan[k][0]) for k in steps],
            "blocks_run": self.blocks_run(),
            "bytes_kept": "fp32 offset h_out - h_in of the span",
        })
        return rep
