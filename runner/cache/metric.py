"""AdaCache's distance metric and MoReg from local partial sums, and the decision as a pure
function of the (globally reduced) sums.

Every quantity is a ratio of global L1 sums, so a rank computes sums over its own shard, one SUM
all-reduce over the agreement group makes them global, and every rank then evaluates `decide` on
bit-identical inputs. Frame differences need no neighbour: a row-sharded
(B, T, S, C) residual holds every frame of its rows, so the frame pairs are all local (the released
code gathers rank-major and shifts by the *local* S, pairing frames across shard boundaries; this
does not).

Sums are accumulated in float64 so the reduced value does not depend on the shard split beyond
rounding far below the codebook's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MoRegParams:
    window: tuple[int, int]  # 1-based steps, inclusive
    strides: tuple[int, ...] = (1,)
    norm: float = 0.385
    power: float = 8.0
    div: float = 1.0
    grad_mul: float = 10.0
    use_grad: bool = True

    def active(self, step: int) -> bool:
        return self.window[0] <= step <= self.window[1]


def l1_sums(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """[sum |prev - cur|, sum |prev|] over this shard (float64)."""
    return torch.stack([(prev.float() - cur.float()).abs().sum(dtype=torch.float64),
                        prev.abs().sum(dtype=torch.float64)])


def motion_sums(r: torch.Tensor, strides, frames: torch.Tensor | None = None) -> torch.Tensor:
    """Per stride i: [sum |R[:, i:] - R[:, :-i]|, sum |R[:, i:]| + sum |R[:, :-i]|] (float64).

    R is (B, T, S, C): the shift is along the frame axis T, within this shard. `frames` (T,) bool,
    if given: only pairs of two True frames count (the generated frames of a conditioned run, so
    the jump at a given/generated seam is not motion); None or all True: every pair, as released.
    """
    if frames is not None and bool(frames.all()):
        frames = None
    per_frame = r.abs().sum(dim=(0, 2, 3), dtype=torch.float64)  # (T,)
    out = []
    for i in strides:
        if i >= r.shape[1]:
            out += [per_frame.new_zeros(()), per_frame.new_zeros(())]
            continue
        if frames is None:
            diff = (r[:, i:].float() - r[:, :-i].float()).abs().sum(dtype=torch.float64)
            out += [diff, per_frame[i:].sum() + per_frame[:-i].sum()]
            continue
        pairs = (frames[i:] & frames[:-i]).to(per_frame.device)
        diff = (r[:, i:].float() - r[:, :-i].float()).abs().sum(dim=(0, 2, 3), dtype=torch.float64)
        out += [diff[pairs].sum(), per_frame[i:][pairs].sum() + per_frame[:-i][pairs].sum()]
    return torch.stack(out) if out else per_frame.new_zeros(0)


def site_sums(prev, cur, step: int, moreg: MoRegParams | None, frames: torch.Tensor | None = None) -> torch.Tensor:
    """The partial sums one metric site contributes at 1-based step `step` (`frames`: motion_sums')."""
    parts = [l1_sums(prev, cur)]
    if moreg is not None and moreg.active(step):
        parts.append(motion_sums(cur, moreg.strides, frames))
    return torch.cat(parts)


def sums_per_site(step: int, moreg: MoRegParams | None) -> int:
    return 2 + (2 * len(moreg.strides) if moreg is not None and moreg.active(step) else 0)


@dataclass
class Decision:
    """What one computed step decided (all values plain floats: JSON-able, comparable bit-wise)."""

    step: int  # 0-based sampler index of the computed step
    rate_prev: int
    rel_l1: list[float]  # per site
    c: float  # the distance compared with the codebook
    rate: int  # the new rate: the next computed step is step + rate (unless forced earlier)
    motion: list[float] | None = None  # per site, raw m (mean over strides); None outside the window
    motion_norm: list[float] | None = None  # per site, m' (1.0 outside the window)
    grad: list[float] | None = None
    factor: list[float] | None = None
    undefined: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        """What must be identical on every rank."""
        return (self.step, self.rate_prev, self.rate, self.c.hex() if self.c == self.c else "nan")


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0.0 else num / den


def decide(sums: list[float], index: int, rate_prev: int, codebook, n_sites: int,
           moreg: MoRegParams | None, moreg_prev: list[float]) -> tuple[Decision, list[float]]:
    """Pure function of the reduced sums -> (decision, new per-site MoReg m'_prev).

    index: 0-based step; the released rule works with 1-based s = index + 1.
    Per site: c_site = (|R_prev - R_cur|_1 / |R_prev|_1) / rate_prev, times the MoReg factor
    m' + |g| with m' = ((m / norm) ** power) / div inside the window (1 outside) and
    g = grad_mul * (m' - m'_prev) / rate_prev. c is the mean over sites (the released running mean
    over cache_loc). A site whose |R_prev|_1 is 0 has no defined distance: c_site = inf, so the
    codebook's fallback (its most conservative rate) applies, as the released NaN does.
    """
    s = index + 1
    per = sums_per_site(s, moreg)
    if len(sums) != per * n_sites:
        raise ValueError(f"expected {per * n_sites} sums for step {s}, got {len(sums)}")
    d = Decision(index, rate_prev, [], 0.0, 0)
    new_prev = list(moreg_prev)
    cs = []
    if moreg is not None:
        d.motion, d.motion_norm, d.grad, d.factor = [], [], [], []
    for k in range(n_sites):
        v = sums[k * per:(k + 1) * per]
        rel = _ratio(v[0], v[1])
        if rel is None:
            d.undefined.append(f"site {k}: |R_prev|_1 = 0")
            rel = float("inf")
        d.rel_l1.append(rel)
        c = rel / rate_prev
        if moreg is not None:
            m = mn = None
            if moreg.active(s):
                ratios = [_ratio(v[2 + 2 * j], v[3 + 2 * j]) for j in range(len(moreg.strides))]
                ratios = [r for r in ratios if r is not None]
                if ratios:
                    m = sum(ratios) / len(ratios)
                    mn = ((m / moreg.norm) ** moreg.power) / moreg.div
                else:
                    d.undefined.append(f"site {k}: no frame pairs for the motion score")
            if mn is None:
                mn = 1.0
            g = moreg.grad_mul * (mn - new_prev[k]) / rate_prev
            new_prev[k] = mn
            factor = mn + (abs(g) if moreg.use_grad else 0.0)
            d.motion.append(m)
            d.motion_norm.append(mn)
            d.grad.append(g)
            d.factor.append(factor)
            c = c * factor
        cs.append(c)
    d.c = sum(cs) / len(cs)
    d.rate = codebook.rate(d.c)
    return d, new_prev
