"""An analytic cost model of one video: compute from FLOPs, communication from the layout's collectives.

    colls = step_collectives(arch, (4, 30, 90, 160), 300, "dsp", sp=8, cfg=1, rank=r, dtype_bytes=2)
    fit = CommFit.load("commfit.json")                 # measured here (runner/scaling/commbench.py) ...
    comm = HARDWARE["h100-nvlink"].comm(sp=8)          # ... or a documented hardware profile
    predict_video(arch, latent, 300, "dsp", 8, pattern, comm, flops_per_s=2e14, reused_s=0.05)

Nothing here runs a model or talks to another process. The collectives are derived from the RowShard
geometry (parallel/shard.py) with exactly the byte accounting of parallel/comm.py's CommLog, so
uneven splits are exact (tests/test_scaling_model.py compares them with a counted dry run). The FLOPs
come from models/flops.py applied to the rank's share. A computed step costs the slowest rank's
compute plus its collectives, one after another (nothing is assumed to overlap); a reused step
costs a fixed overhead and no communication (with cfg=2 only the velocity exchange of the CFG pair).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from models.flops import FlopBreakdown, stdit3_flops
from models.stdit3 import STDiT3Config, get_config
from parallel.mesh import group_ranks
from parallel.shard import row_shard

OPS = ("all_to_all", "all_gather", "all_reduce")
FP32 = 4
# AdaCache's agreement (runner/cache/adacache.py, metric.site_sums): one SUM all-reduce of float64
# partial sums, [sum |prev - cur|, sum |prev|] for its one default metric site (MoReg adds 2 per stride).
ADACACHE_SCALARS = 2
AGREEMENT_DTYPE_BYTES = 8


@dataclass(frozen=True)
class Collective:
    """One collective of one rank, counted as parallel/comm.py's CommLog counts it."""

    op: str  # all_to_all | all_gather | all_reduce
    group_size: int
    bytes: int  # bytes_out: what this rank contributes
    bytes_remote: int  # what leaves this rank
    bytes_in: int  # what arrives at this rank
    tag: str | None = None
    group: str = "sp"  # sp | cfg | agree: which mesh group (decides whether it spans nodes)


# ----------------------------------------------------------------------------- collectives


def _a2a(group_size: int, out: int, kept: int, result: int, tag: str) -> Collective:
    return Collective("all_to_all", group_size, out, out - kept, result - kept, tag)


def _gather(group: str, n: int, mine: int, total: int, tag: str) -> Collective:
    return Collective("all_gather", n, mine, mine * (n - 1), total - mine, tag, group)


def _check(arch: STDiT3Config, layout: str, sp: int, cfg: int) -> None:
    if layout not in ("dsp", "ulysses"):
        raise ValueError(f"unknown layout {layout!r}; use dsp or ulysses")
    if cfg not in (1, 2):
        raise ValueError(f"cfg must be 1 or 2, got {cfg}")
    if layout == "ulysses" and arch.num_heads % sp:
        raise ValueError(f"ulysses needs heads % sp == 0 ({arch.num_heads} heads, sp={sp})")


def rank_batch(cfg: int, batch: int) -> int:
    """Samples one rank runs: the CFG pair [cond; uncond] (2 x batch), or one half with cfg=2."""
    return 2 * batch // cfg


def layout_collectives(arch: STDiT3Config, latent, layout: str, sp: int, cfg: int, rank: int,
                       dtype_bytes: int, batch: int = 1) -> list[Collective]:
    """The layout's all-to-alls of one forward of sp rank `rank`, in the order the hooks issue them."""
    _check(arch, layout, sp, cfg)
    if sp == 1:
        return []  # parallelize() installs no hooks
    g = row_shard(latent, arch.patch_size, sp, rank)
    b, t, c, e = rank_batch(cfg, batch), g.frame_tokens, arch.hidden_size, dtype_bytes
    s, s_r, t_r = sum(g.token_sizes), g.token_sizes[rank], g.frame_sizes[rank]
    if layout == "dsp":
        # (B, T, S_r, C) -> (B, T_r, S, C) and back; the (T_r, S_r) block stays on this rank.
        kept = b * t_r * s_r * c * e
        block = [_a2a(sp, b * t * s_r * c * e, kept, b * t_r * s * c * e, "dsp.to_time"),
                 _a2a(sp, b * t_r * s * c * e, kept, b * t * s_r * c * e, "dsp.to_space")]
    else:
        cp = c // sp  # (H/p heads) x head dim: the channels one rank owns while head-sharded
        block = [
            _a2a(sp, 3 * b * t * s_r * c * e, 3 * b * t * s_r * cp * e, 3 * b * t * s * cp * e, "ulysses.qkv"),
            _a2a(sp, b * t * s * cp * e, b * t * s_r * cp * e, b * t * s_r * c * e, "ulysses.attn_out"),
            _a2a(sp, b * t * s_r * c * e, b * t * s_r * cp * e, b * t * s * cp * e, "ulysses.cross_q"),
            _a2a(sp, b * t * s * cp * e, b * t * s_r * cp * e, b * t * s_r * c * e, "ulysses.cross_out"),
        ]
    return block * arch.depth


def _band_bytes(latent, patch, sp: int, rank: int, batch: int) -> tuple[int, int]:
    """(this rank's fp32 latent band, the whole fp32 latent) in bytes: (batch, C, T, rows_r, W)."""
    ch, t, h, w = latent
    g = row_shard(latent, patch, sp, rank)
    return batch * ch * t * g.latent_row_sizes[rank] * w * FP32, batch * ch * t * h * w * FP32


def cfg_exchange(arch: STDiT3Config, latent, sp: int, rank: int, batch: int = 1) -> Collective:
    """With cfg=2: the all_gather of the fp32 velocity band inside the CFG pair, every step
    (runner/distributed.py ShardedRun._exchange_halves)."""
    mine, _ = _band_bytes(latent, arch.patch_size, sp, rank, batch)
    return _gather("cfg", 2, mine, 2 * mine, "cfg")


def assemble_collective(arch: STDiT3Config, latent, sp: int, rank: int, batch: int = 1) -> Collective | None:
    """The one all_gather of the fp32 latent bands over sp, after the last step (None for sp=1)."""
    if sp == 1:
        return None
    mine, total = _band_bytes(latent, arch.patch_size, sp, rank, batch)
    return _gather("sp", sp, mine, total, "assemble")


def step_collectives(arch: STDiT3Config, latent, text_len: int, layout: str, sp: int, cfg: int, rank: int,
                     dtype_bytes: int, batch: int = 1) -> list[Collective]:
    """Every collective sp rank `rank` issues in one computed step, in order: the layout's all-to-alls
    (B' = 2 x batch for the CFG pair, batch with cfg=2), then with cfg=2 the velocity exchange.
    The cache's decision all-reduce is not included: see `agreement`. text_len does not change any
    collective (the text K/V are replicated, not communicated); it is kept for a uniform signature."""
    out = layout_collectives(arch, latent, layout, sp, cfg, rank, dtype_bytes, batch)
    if cfg == 2:
        out.append(cfg_exchange(arch, latent, sp, rank, batch))
    return out


def agreement(num_scalars: int, group_size: int, dtype_bytes: int = AGREEMENT_DTYPE_BYTES) -> Collective:
    """AdaCache's decision: one SUM all-reduce of `num_scalars` partial sums over the agree group
    (cfg x sp of the prompt) on a computed step that decides (see `decision_steps`)."""
    x = num_scalars * dtype_bytes
    return Collective("all_reduce", group_size, x, x * (group_size - 1), x * (group_size - 1),
                      "cache-decision", "agree")


def decision_steps(pattern: Sequence[bool]) -> list[bool]:
    """Which steps run AdaCache's agreement: a computed step with an earlier computed step (the metric
    compares two residuals) that is not the last step (nothing would use its decision)."""
    out, seen = [], False
    for i, computed in enumerate(pattern):
        out.append(bool(computed and seen and i < len(pattern) - 1))
        seen = seen or bool(computed)
    return out


def spread_pattern(steps: int, computed: int) -> list[bool]:
    """A computed-step pattern with `computed` of `steps` computed: AdaCache always computes steps 1,
    2, N-1 and N (its rate starts at 1), the rest evenly spread. Only the count and the number of
    decision steps matter to the model, not the positions."""
    if not 0 <= computed <= steps:
        raise ValueError(f"computed steps must be in 0..{steps}, got {computed}")
    forced = sorted({0, 1, steps - 2, steps - 1} & set(range(steps)))[:computed]
    free = [i for i in range(steps) if i not in forced]
    k = computed - len(forced)
    picks = {free[round(j * (len(free) - 1) / max(k - 1, 1))] for j in range(k)} if k > 0 else set()
    i = 0
    while len(picks) < k:  # rounding collisions: fill from the start
        picks.add(free[i])
        i += 1
    on = set(forced) | picks
    return [i in on for i in range(steps)]


# ----------------------------------------------------------------------------- FLOPs


def replicated_flops(arch: STDiT3Config, batch: int, text_len: int) -> int:
    """FLOPs every rank repeats whatever its share: timestep/fps embedding, t_block, the caption
    projection and the cross-attention K/V of the text (stdit3_flops with no video tokens)."""
    return stdit3_flops(arch, batch, 0, arch.patch_size[1], arch.patch_size[2], text_len).total


def shard_breakdown(arch: STDiT3Config, latent, text_len: int, layout: str, sp: int, cfg: int, rank: int,
                    batch: int = 1) -> FlopBreakdown:
    """models/flops.py's breakdown for this rank's forward. Token-proportional parts (embedding,
    projections, MLPs, cross- and temporal attention over the rank's S_r, final layer) are
    stdit3_flops of the rank's band of patch rows; spatial attention is DSP's T_r whole frames
    (T_r x S^2) or Ulysses' H/p heads over all S (1/p of the full figure)."""
    _check(arch, layout, sp, cfg)
    _, t, h, w = latent
    b = rank_batch(cfg, batch)
    pt, ph, _ = arch.patch_size
    g = row_shard(latent, arch.patch_size, sp, rank)
    band = stdit3_flops(arch, b, t, g.row_sizes[rank] * ph, w, text_len)
    if sp == 1:
        return band
    if layout == "dsp":
        spatial = stdit3_flops(arch, b, g.frame_sizes[rank] * pt, h, w, text_len).spatial_attn
    else:
        full = stdit3_flops(arch, b, t, h, w, text_len).spatial_attn
        spatial = full // sp  # exact: the head dim x H/p channels are an integer share of C
    return dataclasses.replace(band, spatial_attn=spatial)


def shard_flops(arch: STDiT3Config, latent, text_len: int, layout: str, sp: int, cfg: int, rank: int,
                batch: int = 1) -> float:
    """FLOPs of sp rank `rank`'s forward (see shard_breakdown)."""
    return float(shard_breakdown(arch, latent, text_len, layout, sp, cfg, rank, batch).total)


def token_share(arch: STDiT3Config, latent, sp: int, cfg: int, rank: int) -> float:
    """This rank's video tokens over those of the 1-GPU forward (the CFG pair, whole latent)."""
    g = row_shard(latent, arch.patch_size, sp, rank)
    return g.token_sizes[rank] / sum(g.token_sizes) / cfg


# ----------------------------------------------------------------------------- communication


def byte_figure(c: Collective) -> int:
    """The bytes a collective's time depends on: what must cross this rank's link in its busier
    direction. Links are full duplex, so sending (bytes_remote) and receiving (bytes_in) overlap and
    the larger one governs; the chunk an all-to-all keeps never touches a link, so bytes_out (which
    includes it) would overstate the traffic by p/(p-1)."""
    return max(c.bytes_remote, c.bytes_in)


class CommModel(Protocol):
    def time(self, c: Collective) -> float: ...


@dataclass(frozen=True)
class LinkFit:
    """t = latency_s + bytes / bandwidth_Bps for one op and group size."""

    latency_s: float
    bandwidth_Bps: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


def fit_link(sizes: Sequence[float], seconds: Sequence[float], relative: bool = True) -> LinkFit:
    """Least squares of t = a + b * bytes, a >= 0 (refit through the origin when the free fit gives
    a < 0). relative=True weighs each point by 1/t, i.e. fits the relative error: the sizes span
    several decades, and plain least squares would let the largest messages decide the latency too."""
    xs, ts = [float(x) for x in sizes], [float(t) for t in seconds]
    if len(xs) != len(ts) or len(set(xs)) < 2:
        raise ValueError("fit_link needs at least two distinct sizes, one time each")
    ws = [1.0 / max(t, 1e-12) ** 2 if relative else 1.0 for t in ts]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    mt = sum(w * t for w, t in zip(ws, ts)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    b = sum(w * (x - mx) * (t - mt) for w, x, t in zip(ws, xs, ts)) / sxx
    a = mt - b * mx
    if a < 0:
        a, b = 0.0, sum(w * x * t for w, x, t in zip(ws, xs, ts)) / sum(w * x * x for w, x in zip(ws, xs))
    if b <= 0:  # time does not grow with size (noise): no measurable bandwidth limit
        b = 1e-15
    return LinkFit(a, 1.0 / b)


@dataclass
class CommFit:
    """Measured link fits per (op, group size); `time` of a collective from its byte figure.

    An (op, size) that was not measured uses the nearest measured group size of that op; an op that
    was not measured at all uses all_gather's fit (a scalar all-reduce costs about one latency)."""

    links: dict[tuple[str, int], LinkFit] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def link(self, op: str, group_size: int) -> LinkFit:
        if (op, group_size) in self.links:
            return self.links[op, group_size]
        sizes = [n for o, n in self.links if o == op]
        if not sizes:
            if op != "all_gather":
                return self.link("all_gather", group_size)
            raise KeyError(f"no fit for {op} (measured: {sorted(self.links)})")
        return self.links[op, min(sizes, key=lambda n: (abs(n - group_size), n))]

    def time(self, c: Collective) -> float:
        return self.link(c.op, c.group_size).time(byte_figure(c))

    def to_json(self) -> dict:
        links = [{"op": op, "group_size": n, "latency_s": f.latency_s, "bandwidth_Bps": f.bandwidth_Bps}
                 for (op, n), f in sorted(self.links.items())]
        return {**self.meta, "byte_figure": "max(bytes_remote, bytes_in)", "links": links}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, d: dict) -> "CommFit":
        links = {(x["op"], int(x["group_size"])): LinkFit(float(x["latency_s"]), float(x["bandwidth_Bps"]))
                 for x in d["links"]}
        return cls(links, {k: v for k, v in d.items() if k != "links"})

    @classmethod
    def load(cls, path) -> "CommFit":
        with open(path) as f:
            return cls.from_json(json.load(f))

    @classmethod
    def merge(cls, fits: Sequence["CommFit"]) -> "CommFit":
        """One fit from several (e.g. one commbench run per process count); later ones win."""
        out = cls()
        for f in fits:
            out.links.update(f.links)
        out.meta["merged"] = [f.meta for f in fits]
        return out


# ----------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_Bps: float  # per GPU, one direction: a vendor peak
    latency_s: float  # per collective, small messages


# Calibration of the achieved throughput: AdaCache paper (reference/scaling.md), Open-Sora 1.2 480p 2s,
# 30 steps, 1 A100: 54.02 s without cache, 24.16 s with AdaCache (2.24x).
PAPER_1GPU_S, PAPER_1GPU_ADACACHE_S, PAPER_SPEEDUP = 54.02, 24.16, 2.24
PAPER_8GPU_S, PAPER_8GPU_ADACACHE_S = 12.95, 7.78
PAPER_LATENT, PAPER_TEXT, PAPER_STEPS = (4, 15, 60, 106), 300, 30
A100_PEAK, H100_PEAK = 312e12, 990e12  # dense bf16, vendor figures (reference/scaling.md)


def paper_step_flops() -> float:
    """FLOPs of one CFG-pair forward of STDiT3-XL/2 at the paper's 480p 2s (text 300 tokens)."""
    return float(stdit3_flops(get_config("STDiT3-XL/2"), 2, *PAPER_LATENT[1:], PAPER_TEXT).total)


A100_ACHIEVED = PAPER_STEPS * paper_step_flops() / PAPER_1GPU_S  # about 62.8 TFLOP/s, 20% of peak
H100_ACHIEVED = A100_ACHIEVED * H100_PEAK / A100_PEAK  # assumption: the same fraction of peak

_CAL = (f"achieved FLOP/s = 30 steps x stdit3_flops(XL/2, CFG pair, 480p 2s latent 15x60x106, text 300) / "
        f"{PAPER_1GPU_S} s (AdaCache paper, Open-Sora 1.2, 1 A100, no cache; the whole time is attributed to "
        "the DiT steps)")
NVLINK3 = Link("NVLink 3", 300e9, 20e-6)
NVLINK4 = Link("NVLink 4", 450e9, 20e-6)
IB_HDR = Link("InfiniBand HDR", 25e9, 40e-6)
IB_NDR = Link("InfiniBand NDR", 50e9, 40e-6)
_LINKS = ("bandwidth: vendor peaks per GPU and direction from reference/scaling.md (NVLink 3: 12 x 25 GB/s; "
          "NVLink 4: 18 x 25 GB/s; IB HDR 200 Gb/s and NDR 400 Gb/s, one port per GPU); measured collective "
          "bandwidth is lower. Latency: 20 us per collective on NVLink (reference/scaling.md: 10-30 us), 40 us "
          "across InfiniBand ('tens of microseconds'): assumed mid-range values")


@dataclass(frozen=True)
class Hardware:
    name: str
    gpu: str
    gpus_per_node: int
    peak_flops: float  # dense bf16
    achieved_flops: float  # per GPU on STDiT3 steps
    intra: Link
    inter: Link | None  # None: one node only
    source: str

    def comm(self, sp: int, cfg: int = 1, efficiency: float = 1.0) -> "HardwareComm":
        if self.inter is None and cfg * sp > self.gpus_per_node:
            raise ValueError(f"{self.name} is one node of {self.gpus_per_node} GPUs; {cfg * sp} GPUs need a "
                             f"multi-node profile ({', '.join(n for n, h in HARDWARE.items() if h.inter)})")
        return HardwareComm(self, sp, cfg, efficiency)


@dataclass(frozen=True)
class HardwareComm:
    """Collective times on a hardware profile for a cfg x sp mesh (ranks sp-innermost, as parallel/mesh.py,
    filling nodes in order). Inside a node: the NVLink figures. A group spanning nodes: the slowest link
    governs. An all-to-all sends the off-node share of its bytes over InfiniBand while the rest goes over
    NVLink at the same time; a ring all-gather or all-reduce moves every byte through its slowest hop."""

    hardware: Hardware
    sp: int
    cfg: int = 1
    efficiency: float = 1.0  # fraction of the peak link bandwidth a collective reaches

    def _off_node(self, group: str) -> float:
        """The largest share of a member's peers that sit on another node, over every group of the kind."""
        g, worst = self.hardware.gpus_per_node, 0.0
        for ranks in group_ranks(group, 1, self.cfg, self.sp):
            if len(ranks) < 2:
                continue
            for r in ranks:
                off = sum(1 for q in ranks if q // g != r // g)
                worst = max(worst, off / (len(ranks) - 1))
        return worst

    def time(self, c: Collective) -> float:
        hw, nbytes = self.hardware, byte_figure(c)
        intra_bw = hw.intra.bandwidth_Bps * self.efficiency
        off = self._off_node(c.group)
        if off == 0.0:
            return hw.intra.latency_s + nbytes / intra_bw
        inter_bw = hw.inter.bandwidth_Bps * self.efficiency
        if c.op == "all_to_all":
            return hw.inter.latency_s + max(nbytes * (1 - off) / intra_bw, nbytes * off / inter_bw)
        return hw.inter.latency_s + nbytes / inter_bw


HARDWARE: dict[str, Hardware] = {
    "a100-nvlink": Hardware("a100-nvlink", "A100 SXM 80GB", 8, A100_PEAK, A100_ACHIEVED, NVLINK3, None,
                            f"DGX A100 node, 8 GPUs over NVLink 3 / NVSwitch. Peak bf16 312 TFLOP/s. {_CAL}. {_LINKS}"),
    "h100-nvlink": Hardware("h100-nvlink", "H100 SXM", 8, H100_PEAK, H100_ACHIEVED, NVLINK4, None,
                            f"DGX H100 node, 8 GPUs over NVLink 4 / NVSwitch. Peak bf16 about 990 TFLOP/s. "
                            f"Achieved = the A100 calibration x 990/312 (assumption: the same fraction of peak; "
                            f"not measured). {_CAL}. {_LINKS}"),
    "a100-nvlink-hdr": Hardware("a100-nvlink-hdr", "A100 SXM 80GB", 8, A100_PEAK, A100_ACHIEVED, NVLINK3, IB_HDR,
                                f"DGX A100 nodes (8 GPUs, NVLink 3) joined by InfiniBand HDR, one 200 Gb/s port "
                                f"per GPU. {_CAL}. {_LINKS}"),
    "h100-nvlink-ndr": Hardware("h100-nvlink-ndr", "H100 SXM", 8, H100_PEAK, H100_ACHIEVED, NVLINK4, IB_NDR,
                                f"DGX H100 nodes (8 GPUs, NVLink 4) joined by InfiniBand NDR, one 400 Gb/s port per "
                                f"GPU. Achieved FLOP/s as h100-nvlink (A100 calibration x 990/312, an assumption). "
                                f"{_CAL}. {_LINKS}"),
}
MULTI_NODE = {"a100-nvlink": "a100-nvlink-hdr", "h100-nvlink": "h100-nvlink-ndr"}


def hardware_for(name: str, gpus: int) -> Hardware:
    """The profile `name`, or its multi-node variant when `gpus` exceed one node."""
    hw = HARDWARE[name]
    if gpus > hw.gpus_per_node and hw.inter is None:
        hw = HARDWARE[MULTI_NODE[name]]
    return hw


# ----------------------------------------------------------------------------- prediction


def _per_rank(flops_per_s, sp: int) -> list[float]:
    if isinstance(flops_per_s, (int, float)):
        return [float(flops_per_s)] * sp
    out = [float(x) for x in flops_per_s]
    if len(out) != sp:
        raise ValueError(f"flops_per_s: one figure or one per sp rank ({sp}), got {len(out)}")
    return out


def _result(pattern, computed_parts, reused_parts, assemble_s, **extra) -> dict:
    """Sum per-step (compute, comm) pairs of computed and reused steps into the returned dict."""
    compute = sum(c for c, _ in computed_parts)
    comm = sum(m for _, m in computed_parts) + sum(m for _, m in reused_parts) + assemble_s
    reused = sum(c for c, _ in reused_parts)
    return {"compute_s": compute, "comm_s": comm, "reused_s": reused, "total_s": compute + comm + reused,
            "steps": len(pattern), "computed_steps": sum(map(bool, pattern)), "assemble_s": assemble_s, **extra}


def predict_video(arch: STDiT3Config, latent, text_len: int, layout: str, sp: int, pattern: Sequence[bool],
                  comm: CommModel, flops_per_s, reused_s: float = 0.0, *, cfg: int = 1, batch: int = 1,
                  dtype_bytes: int = 2, agreement_scalars: int = 0) -> dict:
    """SkipSync's sampling time of one video for a computed-step pattern (True = computed).

    Computed step: max over sp ranks of shard FLOPs / flops_per_s (one figure, or one per sp rank, e.g.
    the 1-GPU throughput times the cores a rank really had) plus the time of every collective of that
    rank (step_collectives), plus, when agreement_scalars > 0 (an adaptive policy), the agreement
    all-reduce on decision steps. Reused step: reused_s (the 1-GPU reused-step time) times the rank's
    token share, and no communication except, with cfg=2, the velocity exchange. Plus the one latent
    assemble per video. Returns compute_s, comm_s, reused_s, total_s (and details)."""
    thr = _per_rank(flops_per_s, sp)
    decide = decision_steps(pattern)
    agree = agreement(agreement_scalars, cfg * sp) if agreement_scalars and cfg * sp > 1 else None
    per_rank = []
    for r in range(sp):
        compute = shard_flops(arch, latent, text_len, layout, sp, cfg, r, batch) / thr[r]
        colls = step_collectives(arch, latent, text_len, layout, sp, cfg, r, dtype_bytes, batch)
        reuse_comm = comm.time(cfg_exchange(arch, latent, sp, r, batch)) if cfg == 2 else 0.0
        asm = assemble_collective(arch, latent, sp, r, batch)
        share = token_share(arch, latent, sp, cfg, r)
        per_rank.append({"compute": compute, "comm": sum(comm.time(c) for c in colls),
                         "bytes": sum(c.bytes for c in colls), "reuse": reused_s * share,
                         "reuse_comm": reuse_comm, "assemble": comm.time(asm) if asm else 0.0})
    agree_s = comm.time(agree) if agree else 0.0

    def slowest(key):
        return max(per_rank, key=key)

    computed_parts, reused_parts = [], []
    for on, dec in zip(pattern, decide):
        if on:
            x = slowest(lambda p: p["compute"] + p["comm"])
            computed_parts.append((x["compute"], x["comm"] + (agree_s if dec else 0.0)))
        else:
            x = slowest(lambda p: p["reuse"] + p["reuse_comm"])
            reused_parts.append((x["reuse"], x["reuse_comm"]))
    return _result(pattern, computed_parts, reused_parts, max(p["assemble"] for p in per_rank),
                   bytes_per_computed_step=max(p["bytes"] for p in per_rank),
                   decisions=sum(decide) if agree else 0)


def hidden_gather(arch: STDiT3Config, latent, sp: int, cfg: int, rank: int, dtype_bytes: int,
                  batch: int = 1) -> Collective:
    """Open-Sora 1.2's all_gather of the hidden state (B', T, S_r, C) along S after the blocks."""
    g = row_shard(latent, arch.patch_size, sp, rank)
    per_token = rank_batch(cfg, batch) * g.frame_tokens * arch.hidden_size * dtype_bytes
    return _gather("sp", sp, per_token * g.token_sizes[rank], per_token * sum(g.token_sizes), "hidden")


def peer_predict_video(arch: STDiT3Config, latent, text_len: int, layout: str, sp: int, pattern: Sequence[bool],
                       comm: CommModel, flops_per_s, reused_s: float = 0.0, *, cfg: int = 1, batch: int = 1,
                       dtype_bytes: int = 2, cached_all_reduces: int = 2, metric_gathers: bool = False,
                       reused_replicated: float = 1.0) -> dict:
    """The peers' scheme (reference/peers.md): Open-Sora 1.2's SP as the official AdaCache SP path runs
    it, with xDiT / ParaAttention-style decisions on cached steps. Assumptions, exactly:

    - computed step: the layout's all-to-alls (layout_collectives; Open-Sora's own layout is ulysses)
      and, after the blocks, an all_gather of the bf16 hidden state (B', T, S_r, C) over sp; the final
      layer then runs on the full token grid on every rank (its FLOPs are not divided), as does the
      patch embedding (Open-Sora embeds before it splits). The shard's other FLOPs as SkipSync's.
    - cached step: the same hidden-state all_gather (the per-step output gather is never skipped; it
      is the "gather" of a cached step, counted once) plus `cached_all_reduces` blocking all-reduces
      of one fp32 scalar each (FBCache-style mean_diff and mean_t1, AVG) over the agree group. Of the
      reused-step work, the fraction `reused_replicated` runs on the full grid on every rank (embed
      and final layer; default 1: all of it) and the rest is divided over sp like SkipSync's (the
      cached residual adds on the shard); with cfg=2 all of it is halved. reused_replicated=0 leaves
      the peers' communication as the only difference from SkipSync on a cached step.
    - metric_gathers=True adds the official AdaCache decision: two all_gathers of the metric residual
      (the size of the hidden state) on each decision step, O(activation) instead of O(1).
    - with cfg=2 the velocity exchange of the CFG pair every step, as for SkipSync.
    - no final assemble: every rank already holds the full latent.
    - not modelled (each would make the peers slower): FBCache's block 0 with its all-to-alls on a
      cached step, the all-reduces that FBCache-style peers also run on computed steps, host syncs
      beyond the collective's latency, Open-Sora's padding of S to a multiple of p (the RowShard
      geometry, uneven but unpadded, is used instead)."""
    thr = _per_rank(flops_per_s, sp)
    decide = decision_steps(pattern)
    b = rank_batch(cfg, batch)
    full = stdit3_flops(arch, b, *latent[1:], text_len)
    scalar = Collective("all_reduce", cfg * sp, FP32, FP32 * (cfg * sp - 1), FP32 * (cfg * sp - 1), "peer-decision",
                        "agree")
    per_rank = []
    for r in range(sp):
        f = shard_breakdown(arch, latent, text_len, layout, sp, cfg, r, batch)
        flops = f.total - f.final - f.embed + full.final + full.embed
        every = [hidden_gather(arch, latent, sp, cfg, r, dtype_bytes, batch)] if sp > 1 else []
        if cfg == 2:
            every.append(cfg_exchange(arch, latent, sp, r, batch))
        every_s = sum(comm.time(c) for c in every)
        layout_s = sum(comm.time(c) for c in layout_collectives(arch, latent, layout, sp, cfg, r, dtype_bytes, batch))
        cached_s = cached_all_reduces * comm.time(scalar) if cfg * sp > 1 else 0.0
        metric_s = 2 * comm.time(every[0]) if metric_gathers and sp > 1 else 0.0
        share = token_share(arch, latent, sp, cfg, r)
        reuse = reused_s * (reused_replicated / cfg + (1 - reused_replicated) * share)
        per_rank.append({"compute": flops / thr[r], "comm": layout_s + every_s, "cached": every_s + cached_s,
                         "metric": metric_s, "reuse": reuse})

    computed_parts, reused_parts = [], []
    for on, dec in zip(pattern, decide):
        if on:
            x = max(per_rank, key=lambda p: p["compute"] + p["comm"])
            computed_parts.append((x["compute"], x["comm"] + (x["metric"] if dec else 0.0)))
        else:
            reused_parts.append((max(p["reuse"] for p in per_rank), max(p["cached"] for p in per_rank)))
    return _result(pattern, computed_parts, reused_parts, 0.0)


def paper_reused_fraction(computed: int | None = None) -> float:
    """The reused-step time over the computed-step time at 1 GPU, from the AdaCache paper's 1-A100
    figures: 24.16 s = k x (54.02/30) + (30 - k) x reused, with k = round(30 / 2.24) = 13 computed
    steps (the paper gives the speed-up, not the count)."""
    k = round(PAPER_STEPS / PAPER_SPEEDUP) if computed is None else computed
    step = PAPER_1GPU_S / PAPER_STEPS
    return max(0.0, (PAPER_1GPU_ADACACHE_S - k * step) / (PAPER_STEPS - k)) / step


def default_computed(steps: int) -> int:
    """Computed steps of `steps` for AdaCache from the paper's 1-GPU speed-up (2.24x at 30 steps)."""
    return max(1, min(steps, round(steps / PAPER_SPEEDUP)))


__all__ = [
    "ADACACHE_SCALARS", "Collective", "CommFit", "CommModel", "HARDWARE", "Hardware", "HardwareComm", "Link",
    "LinkFit", "agreement", "assemble_collective", "byte_figure", "cfg_exchange", "decision_steps",
    "default_computed", "fit_link", "hardware_for", "hidden_gather", "layout_collectives", "paper_reused_fraction",
    "peer_predict_video", "predict_video", "replicated_flops", "shard_breakdown", "shard_flops", "spread_pattern",
    "step_collectives", "token_share",
]
