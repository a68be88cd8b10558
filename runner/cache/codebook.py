"""AdaCache codebooks (distance -> cache rate) and the MoReg window, as published.

A codebook is a step function: the first threshold the distance is below gives the rate, anything
at or above the last threshold gets the fallback rate. The released code writes it as a dict whose
last key (1.00) is never compared; `Codebook.from_released` keeps that form recognisable.

Published codebooks exist for 30 steps (fast, slow) and 100 steps (fast) of Open-Sora 1.2
(reference/adacache.md section 2.4). For another step count the codebook of the *nearest*
published step count with the same speed is used (ties go to the smaller count, whose rates are
lower, i.e. more conservative) and the choice is reported as approximate; `cache.codebook_steps`
forces one, `cache.codebook_thresholds` / `cache.codebook_rates` replace it entirely.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Codebook:
    thresholds: tuple[float, ...]  # strictly increasing
    rates: tuple[int, ...]  # len(thresholds) + 1; rates[-1] is the fallback
    source: str = "custom"
    exact: bool = True  # False: published for another step count

    def __post_init__(self):
        if len(self.rates) != len(self.thresholds) + 1:
            raise ValueError(f"a codebook needs one more rate than thresholds, got {len(self.thresholds)} "
                             f"thresholds and {len(self.rates)} rates")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"codebook thresholds must increase strictly, got {list(self.thresholds)}")
        if any(int(r) != r or r < 1 for r in self.rates):
            raise ValueError(f"codebook rates must be integers >= 1, got {list(self.rates)}")

    @classmethod
    def from_released(cls, d: dict[float, int], source: str) -> "Codebook":
        """The released dict form {th0: r0, ..., thK: rK}: thK is never compared."""
        keys, vals = list(d), list(d.values())
        return cls(tuple(keys[:-1]), tuple(vals), source)

    def rate(self, c: float) -> int:
        """The rate for distance c: rates[i] for the first i with c < thresholds[i], else rates[-1].

        NaN compares false everywhere and gets the fallback, as in the released code.
        """
        if c != c:  # NaN
            return self.rates[-1]
        return self.rates[bisect.bisect_right(self.thresholds, c)]

    def describe(self) -> dict:
        return {"thresholds": list(self.thresholds), "rates": list(self.rates), "source": self.source,
                "exact": self.exact}


# reference/adacache.md 2.4: (num_steps, speed) -> released dict form.
PUBLISHED: dict[tuple[int, str], dict[float, int]] = {
    (100, "fast"): {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3},
    (30, "fast"): {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1},
    (30, "slow"): {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1},
}
SPEEDS = ("fast", "slow")

# reference/adacache.md 3: MoReg window (1-based steps, inclusive) per published step count.
MOREG_WINDOWS: dict[int, tuple[int, int]] = {30: (4, 26), 100: (10, 90)}


def nearest(num_steps: int, candidates) -> int:
    """The candidate closest to num_steps; ties go to the smaller one."""
    return min(sorted(candidates), key=lambda n: abs(n - num_steps))


def select_codebook(num_steps: int, speed: str = "fast", codebook_steps: int | None = None,
                    thresholds=None, rates=None) -> Codebook:
    if thresholds is not None or rates is not None:
        if thresholds is None or rates is None:
            raise ValueError("a custom codebook needs both cache.codebook_thresholds and cache.codebook_rates")
        return Codebook(tuple(float(t) for t in thresholds), tuple(int(r) for r in rates), "custom")
    if speed not in SPEEDS:
        raise ValueError(f"cache.speed={speed!r} is not known; use one of {', '.join(SPEEDS)}")
    counts = [n for (n, s) in PUBLISHED if s == speed]
    if codebook_steps is not None:
        if (codebook_steps, speed) not in PUBLISHED:
            raise ValueError(f"no published {speed} codebook for {codebook_steps} steps; published: "
                             + ", ".join(f"{n}-step {s}" for n, s in PUBLISHED))
        n = codebook_steps
    else:
        n = nearest(num_steps, counts)
    exact = n == num_steps
    source = f"published {n}-step {speed}"
    if not exact:
        source += f" (no published {speed} codebook for {num_steps} steps; nearest used)"
    cb = Codebook.from_released(PUBLISHED[(n, speed)], source)
    return Codebook(cb.thresholds, cb.rates, source, exact)


def moreg_window(num_steps: int, override=None) -> tuple[int, int]:
    """[first, last] 1-based steps (inclusive) in which MoReg is active.

    Published: (4, 26) for 30 steps, (10, 90) for 100 steps. Another step count scales the
    nearest published window proportionally (rounded), so the window follows the configured steps.
    """
    if override is not None:
        lo, hi = (int(v) for v in override)
        return lo, hi
    if num_steps in MOREG_WINDOWS:
        return MOREG_WINDOWS[num_steps]
    n = nearest(num_steps, MOREG_WINDOWS)
    lo, hi = MOREG_WINDOWS[n]
    return max(1, round(lo * num_steps / n)), max(1, round(hi * num_steps / n))
