"""Predicted sampling time of STDiT3-XL/2 on documented hardware, SkipSync against the peers' scheme.

    python -m runner.scaling.predict                                   # H100, 720p 4s, 1..64 GPUs
    python -m runner.scaling.predict --hardware a100-nvlink --size 480p-2s --gpus 1 2 4 8

Prints a Markdown table per size: for every GPU count and layout (sp = GPUs by default; with
--cfg 2 a CFG-parallel pair x sp, with --cfg best whichever of the two is faster without cache) the
time without cache and with AdaCache (runner/scaling/costmodel.py predict_video), the cache's
speed-up and its retention (speed-up at N over speed-up at 1), and the same for the peers' scheme
(peer_predict_video). Then one check line: the peers' scheme at 8 A100s, 480p 2s, against the
AdaCache paper's 8-GPU figures.

Defaults and their sources: CFG pair (batch 1 prompt), text 300 tokens, bf16. AdaCache's computed
steps: 30 / 2.24 (the paper's 1-GPU speed-up) = 13 of 30; its reused-step time: what the paper's
1-GPU AdaCache time leaves after those 13 computed steps (2.5% of a computed step), scaled with the
hardware's throughput and the video's size.
"""

from __future__ import annotations

import argparse
import sys

from models.flops import stdit3_flops
from models.stdit3 import get_config
from parallel.shard import row_shard
from runner.scaling import costmodel as cm

SIZES = {  # Open-Sora VAE 4x8x8 (4 latent channels), as bench/flops.py and bench/comm_bytes.py
    "480p-2s": (4, 15, 60, 106),
    "720p-4s": (4, 30, 90, 160),
}
CFGS = {"1": (1,), "2": (2,), "best": (1, 2)}  # --cfg: sequence parallelism alone, CFG-parallel x sp, or the faster
TEXT_LEN = 300
DTYPE_BYTES = 2  # bf16


def meshes(arch, latent, layout: str, gpus: int, cfgs=(1, 2)) -> list[tuple[int, int]]:
    """Feasible (cfg, sp) for `gpus` GPUs and one prompt: Ulysses needs heads % sp == 0, and every
    sp rank needs at least one patch row."""
    out = []
    for cfg in cfgs:
        if gpus % cfg:
            continue
        sp = gpus // cfg
        if layout == "ulysses" and arch.num_heads % sp:
            continue
        try:
            row_shard(latent, arch.patch_size, sp, 0)
        except ValueError:
            continue
        out.append((cfg, sp))
    return out


def point(arch, latent, layout: str, gpus: int, hw_name: str, pattern, reused_s: float, efficiency: float,
          cfgs=(1,)):
    """The predictions at one GPU count and layout, on the mesh (cfg in cfgs) that is fastest without
    cache; None if no mesh fits."""
    hw = cm.hardware_for(hw_name, gpus)
    best = None
    for cfg, sp in meshes(arch, latent, layout, gpus, cfgs):
        comm = hw.comm(sp, cfg, efficiency)
        common = dict(arch=arch, latent=latent, text_len=TEXT_LEN, layout=layout, sp=sp, comm=comm,
                      flops_per_s=hw.achieved_flops, reused_s=reused_s, cfg=cfg, dtype_bytes=DTYPE_BYTES)
        full = [True] * len(pattern)
        row = {"gpus": gpus, "layout": layout, "cfg": cfg, "sp": sp, "hardware": hw.name,
               "none": cm.predict_video(pattern=full, **common),
               "ada": cm.predict_video(pattern=pattern, agreement_scalars=cm.ADACACHE_SCALARS, **common),
               "peer_none": cm.peer_predict_video(pattern=full, **common),
               "peer_ada": cm.peer_predict_video(pattern=pattern, **common),
               "peer_ada_comm": cm.peer_predict_video(pattern=pattern, reused_replicated=0.0, **common)}
        if best is None or row["none"]["total_s"] < best["none"]["total_s"]:
            best = row
    return best


def _mesh(row) -> str:
    return f"sp{row['sp']}" if row["cfg"] == 1 else f"cfg2 x sp{row['sp']}"


def table(arch, latent, size: str, args, pattern, reused_s: float) -> list[str]:
    base = {}  # layout -> the cache's speed-ups at 1 GPU (SkipSync, peers): the retention's reference
    lines = [f"### {size} (latent {'x'.join(map(str, latent))}), {sum(pattern)} of {len(pattern)} steps computed "
             f"with AdaCache", "",
             "| GPUs | layout | mesh | no-cache s | AdaCache s | cache speed-up | retention | peers no-cache s "
             "| peers AdaCache s | peers speed-up | peers retention | peers retention, comm only "
             "| comm share (no cache / AdaCache) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for gpus in args.gpus:
        for layout in args.layouts:
            row = point(arch, latent, layout, gpus, args.hardware, pattern, reused_s, args.link_efficiency,
                        CFGS[args.cfg])
            if row is None:
                sp = gpus // max(CFGS[args.cfg])
                rows = -(-latent[2] // arch.patch_size[1])
                why = (f"{arch.num_heads} heads % sp" if layout == "ulysses" and arch.num_heads % sp
                       else f"{rows} patch rows < sp")
                lines.append(f"| {gpus} | {layout} | n/a ({why}) |" + " |" * 10)
                continue
            none, ada, pn, pa = (row[k]["total_s"] for k in ("none", "ada", "peer_none", "peer_ada"))
            speed, pspeed = none / ada, pn / pa
            if layout not in base:
                one = point(arch, latent, layout, 1, args.hardware, pattern, reused_s, args.link_efficiency)
                base[layout] = tuple(one[a]["total_s"] / one[b]["total_s"] for a, b in
                                     (("none", "ada"), ("peer_none", "peer_ada"), ("peer_none", "peer_ada_comm")))
            s1, p1, c1 = base[layout]
            comm_only = pn / row["peer_ada_comm"]["total_s"] / c1
            share = (row["none"]["comm_s"] / none, row["ada"]["comm_s"] / ada)
            lines.append(f"| {gpus} | {layout} | {_mesh(row)} | {none:.2f} | {ada:.2f} | {speed:.2f}x | "
                         f"{speed / s1:.1%} | {pn:.2f} | {pa:.2f} | {pspeed:.2f}x | {pspeed / p1:.1%} | "
                         f"{comm_only:.1%} | "
                         f"{share[0]:.1%} / {share[1]:.1%} |")
    return lines


def check_line(reused_fraction: float, computed: int) -> str:
    """The peers' scheme at 8 A100s, 480p 2s (DSP: the paper follows DSP, and Open-Sora's own Ulysses
    needs S % 8 == 0, which 480p's 1590 tokens per frame are not) against the AdaCache paper."""
    arch, latent, hw = get_config("STDiT3-XL/2"), SIZES["480p-2s"], cm.HARDWARE["a100-nvlink"]
    step_s = cm.paper_step_flops() / hw.achieved_flops
    pattern = cm.spread_pattern(cm.PAPER_STEPS, computed)
    common = dict(arch=arch, latent=latent, text_len=TEXT_LEN, layout="dsp", sp=8, comm=hw.comm(8),
                  flops_per_s=hw.achieved_flops, reused_s=reused_fraction * step_s, dtype_bytes=DTYPE_BYTES)
    none = cm.peer_predict_video(pattern=[True] * cm.PAPER_STEPS, **common)["total_s"]
    ada = cm.peer_predict_video(pattern=pattern, **common)["total_s"]
    pn, pa = cm.PAPER_8GPU_S, cm.PAPER_8GPU_ADACACHE_S
    return (f"check: peers' scheme, 8 A100 (NVLink 3), 480p 2s, DSP, {computed}/30 computed: predicted {none:.2f} s -> "
            f"{ada:.2f} s ({none / ada:.2f}x); AdaCache paper: {pn} s -> {pa} s ({pn / pa:.2f}x); "
            f"difference {none / pn - 1:+.0%} / {ada / pa - 1:+.0%} (speed-up {none / ada / (pn / pa) - 1:+.0%}). "
            "The model keeps the 1-GPU throughput per GPU at 8 GPUs and uses peak link bandwidth, so it is "
            "optimistic where the paper's 8-GPU run lost per-GPU efficiency or has unparallelised time.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.scaling predict", description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="h100-nvlink", choices=sorted(cm.HARDWARE),
                    help="profile; beyond one node its multi-node variant is used automatically")
    ap.add_argument("--size", nargs="+", default=["720p-4s"], choices=sorted(SIZES))
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--computed", type=int, default=None,
                    help="AdaCache's computed steps (default: steps / 2.24, the paper's 1-GPU speed-up)")
    ap.add_argument("--layouts", nargs="+", default=["dsp", "ulysses"], choices=["dsp", "ulysses"])
    ap.add_argument("--cfg", default="1", choices=sorted(CFGS),
                    help="1: sp = GPUs (default); 2: CFG-parallel pair x sp = GPUs/2; best: the faster without cache")
    ap.add_argument("--link-efficiency", type=float, default=1.0,
                    help="fraction of the vendor's peak link bandwidth that collectives reach (default: the peak)")
    args = ap.parse_args(argv)
    if min(args.gpus) < 1 or args.steps < 1 or not 0 < args.link_efficiency <= 1:
        ap.error("--gpus and --steps must be >= 1 and --link-efficiency in (0, 1]")

    arch = get_config("STDiT3-XL/2")
    computed = cm.default_computed(args.steps) if args.computed is None else args.computed
    pattern = cm.spread_pattern(args.steps, computed)
    frac = cm.paper_reused_fraction()
    hw = cm.HARDWARE[args.hardware]
    print(f"# Predicted sampling time, STDiT3-XL/2, CFG pair, text {TEXT_LEN} tokens, bf16, {args.steps} steps\n")
    multi = cm.hardware_for(args.hardware, hw.gpus_per_node + 1).name
    print(f"hardware: {args.hardware} (beyond {hw.gpus_per_node} GPUs: {multi}); "
          f"achieved {hw.achieved_flops / 1e12:.1f} TFLOP/s per GPU of {hw.peak_flops / 1e12:.0f} peak; "
          f"link bandwidth x {args.link_efficiency:g} of peak")
    print(f"AdaCache: {computed} of {args.steps} steps computed"
          f"{' (steps / 2.24, the paper' + chr(39) + 's 1-GPU speed-up)' if args.computed is None else ''}; "
          f"reused step = {frac:.1%} of a 1-GPU computed step (from the paper's 1-GPU times), divided over the sp "
          "ranks for SkipSync (sharded latent)")
    print("peers' scheme: Open-Sora's SP with an all-gather of the hidden state every step, 2 blocking scalar "
          "all-reduces on every cached step, embedding and final layer on the full grid on every rank (so its "
          "reused step is not divided); 'comm only': the same with the reused step divided like SkipSync's, so that "
          "the peers' communication on cached steps is the only difference; see runner/scaling/costmodel.py "
          "peer_predict_video\n")
    for size in args.size:
        latent = SIZES[size]
        step_s = stdit3_flops(arch, 2, *latent[1:], TEXT_LEN).total / hw.achieved_flops
        print("\n".join(table(arch, latent, size, args, pattern, frac * step_s)))
        print()
    print(check_line(frac, cm.default_computed(cm.PAPER_STEPS)))
    print(f"\nsources: {hw.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
