"""Collective latency and bandwidth on this machine's backend, for several process counts.

    python bench/collectives.py --p 2 3 4 --out DIR     # gloo on CPU, nccl on CUDA

Runs runner/scaling/commbench.py under runner.launch once per process count (DIR/commfit_p<P>.json),
prints one table (min and median per op and size, the slowest rank's time) and the fitted latency
and bandwidth per op and P, and writes them merged into DIR/commfit.json, the file
`runner.scaling` reads to predict measured points. Extra arguments go to commbench (--sizes,
--reps, --warmup, --ops).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from runner.scaling.costmodel import CommFit  # noqa: E402


def run_one(p: int, out: str, extra: list[str]) -> CommFit:
    cmd = [sys.executable, "-m", "runner.launch", "--standalone", f"--nproc_per_node={p}",
           "-m", "runner.scaling.commbench", "--out", out, *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"commbench with {p} processes failed (exit code {res.returncode}): {' '.join(cmd)}")
    return CommFit.load(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--out", default="outputs/collectives", help="folder for the JSON files (default: ignored by git)")
    args, extra = ap.parse_known_args()
    os.makedirs(args.out, exist_ok=True)

    fits, t0 = [], time.perf_counter()
    for p in args.p:
        fits.append(run_one(p, os.path.join(args.out, f"commfit_p{p}.json"), extra))
    merged = CommFit.merge(fits)
    merged.save(os.path.join(args.out, "commfit.json"))

    m = fits[0].meta
    print(f"backend {m['backend']}, device {m.get('device_name', m['device'])}, threads per rank: "
          + ", ".join(f"P={f.meta['world_size']}: {f.meta['threads']}" for f in fits))
    print("time of the slowest rank, min / median over runs, in us; link bytes: max(bytes_remote, bytes_in)\n")
    head = "| op | bytes/rank | " + " | ".join(f"P={f.meta['world_size']} min / median" for f in fits) + " |"
    print(head)
    print("|---|---:|" + "---:|" * len(fits))
    keys = sorted({(x["op"], x["size"]) for f in fits for x in f.meta["points"]})
    for op, nbytes in keys:
        cells = []
        for f in fits:  # by requested size: an all_to_all input is rounded to a multiple of p rows
            x = next((x for x in f.meta["points"] if x["op"] == op and x["size"] == nbytes), None)
            cells.append("" if x is None else f"{x['min_s'] * 1e6:.0f} / {x['median_s'] * 1e6:.0f}")
        if any(cells):
            print(f"| {op} | {nbytes} | " + " | ".join(cells) + " |")
    print("\n| op | P | latency us | bandwidth GB/s |\n|---|---:|---:|---:|")
    for (op, n), f in sorted(merged.links.items()):
        print(f"| {op} | {n} | {f.latency_s * 1e6:.1f} | {f.bandwidth_Bps / 1e9:.3f} |")
    print(f"\nwrote {os.path.join(args.out, 'commfit.json')} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
