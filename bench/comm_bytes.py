"""Collective bytes per GPU per sampling step of STDiT3-XL/2 at 720p 4s, DSP vs Ulysses.

    python bench/comm_bytes.py            # p = 2, 4, 8
    python bench/comm_bytes.py --p 2 3 8

A dry run with the real shapes: the model is built on the meta device (no memory, no compute),
the layout is installed with a `DryComm` (the counted `Comm` with the data movement left out), and
one forward of the CFG pair (B=2, bf16, latent 4 x 30 x 90 x 160, 300 text tokens) is run for every
rank of every p. The figures are the CommLog's counts of that forward, i.e. one sampling step:

    payload  bytes each rank hands to its all-to-alls (the DESIGN's E/p figures)
    egress   the part of it that leaves the GPU (payload minus the chunk a rank keeps), which is
             what reference/opensora.md section 3 quotes: 3.05 GB (DSP) and 9.14 GB (Ulysses) at p=8.

Open-Sora 1.2 also all-gathers the hidden state after the blocks in every step ((p-1)E/p in,
0.44 GB at p=8); SkipSync keeps the latent sharded and all-gathers the latent once per video.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.stdit3 import build_stdit3, get_config  # noqa: E402
from parallel.dry import dry_comm  # noqa: E402
from parallel.layouts import parallelize  # noqa: E402

LATENT = (4, 30, 90, 160)  # 720p (720 x 1280 / 8), 4 s (102 frames -> 30 latent frames)
HEIGHT, WIDTH = 720, 1280
REFERENCE_P8 = {"dsp": 3.05e9, "ulysses": 9.14e9}  # egress per GPU per step, reference/opensora.md 3.1-3.2
GB = 1e9


def one_step(model, layout: str, p: int, r: int) -> dict:
    """Counted collectives of rank r of p for one forward of the CFG pair."""
    comm = dry_comm(r, sp=p)
    sp = parallelize(model, comm.mesh, comm, layout)
    try:
        z = torch.empty(2, *LATENT, device="meta")
        shard = sp.shard(z.shape)
        y = torch.empty(2, 300, model.config.caption_channels, device="meta")
        mask = torch.ones(1, 300, device="meta")
        comm.log.set_step(0)
        with torch.no_grad():
            model(shard.slice(z), torch.full((2,), 900.0, device="meta"), y, mask, height=HEIGHT, width=WIDTH,
                  rows=shard.rows)
        return comm.log.per_step()[0]
    finally:
        sp.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()

    cfg = get_config("STDiT3-XL/2")
    model = build_stdit3(cfg, device="meta", dtype=torch.bfloat16)
    t, h, w = LATENT[1:]
    s = -(-h // 2) * -(-w // 2)
    e = 2 * t * s * cfg.hidden_size * 2  # the hidden state's bytes: B' x T x S x C x bf16
    print(f"STDiT3-XL/2, 720p 4s: latent {t}x{h}x{w}, tokens {t}x{s}, B=2 (CFG pair), bf16, depth {cfg.depth}")
    print(f"E = {e / 1e6:.1f} MB (hidden state); per GPU per step, from the counted collectives of a dry run:\n")
    head = f"{'layout':8} {'p':>2} {'a2a/step':>8} {'payload GB':>11} {'egress GB':>10} {'egress max':>10} " \
           f"{'formula':>8}  {'reference':>9}"
    print(head)
    print("-" * len(head))
    t0 = time.perf_counter()
    for layout, per_layer in (("dsp", 2), ("ulysses", 6)):
        for p in args.p:
            if layout == "ulysses" and cfg.num_heads % p:
                print(f"{layout:8} {p:>2}  not possible: {cfg.num_heads} heads % {p} != 0")
                continue
            steps = [one_step(model, layout, p, r)["all_to_all"] for r in range(p)]
            counts = {x["count"] for x in steps}
            assert len(counts) == 1, counts
            payload = sum(x["bytes"] for x in steps) / p
            egress = [x["bytes_remote"] for x in steps]
            formula = cfg.depth * per_layer * e / p * (p - 1) / p  # egress of the even split
            ref = f"{REFERENCE_P8[layout] / GB:9.2f}" if p == 8 else ""
            print(f"{layout:8} {p:>2} {counts.pop():>8} {payload / GB:>11.2f} {sum(egress) / p / GB:>10.2f} "
                  f"{max(egress) / GB:>10.2f} {formula / GB:>8.2f}  {ref}")
    print("\npayload, egress: mean over the p ranks; egress max: the busiest rank (uneven splits: T=30 and 45 patch")
    print("rows do not divide by every p); formula: depth x (2 | 6) x E/p x (p-1)/p; reference: opensora.md at p=8.")
    print("Outside the loop SkipSync all-gathers the fp32 latent once per video "
          f"({4 * t * h * w * 4 / 1e6:.1f} MB in all); Open-Sora 1.2 all-gathers the hidden state every step "
          f"((p-1)E/p: {7 * e / 8 / GB:.2f} GB at p=8).")
    print(f"(dry run: {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
