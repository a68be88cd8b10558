"""Cache policies on this CPU with the default model: DiT time, total time, computed fraction, and
PSNR/SSIM of every video against the uncached one with the same seed.

    python bench/cache_bench.py                        # model=demo, 30 steps, 4 held-out captions
    python bench/cache_bench.py --weights PATH --prompts 8 --repeats 3 [hydra overrides...]
    python bench/cache_bench.py --policies none teacache pab246 --prompts 1 --repeats 1

Computed fraction: of the block stack's work (whole-stack policies: computed steps / steps;
Delta-DiT: block calls; PAB: attention and MLP module calls), per the policy's report.

Weights: --weights, else assets/demo when the trained demo model is there, else random weights
(said in the output; with random weights the temporal branches are initialised to zero, so the
default t-attn metric is undefined and AdaCache falls back to computing every step).
Times: per video, the minimum over --repeats runs (the configurations are interleaved, so load
from other processes hits all of them alike), averaged over the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runner.assemble import assemble  # noqa: E402
from runner.config import resolve_device, resolve_dtype  # noqa: E402
from runner.demo import judge  # noqa: E402
from runner.demo.data import HELDOUT_CAPTIONS  # noqa: E402
from runner.demo.evaluate import compose_config  # noqa: E402
from runner.families import build_pipeline  # noqa: E402
from runner.generate import generate_one, prompt_seed  # noqa: E402
from runner.video import to_uint8  # noqa: E402

POLICIES = ("none", "adacache", "adacache-slow", "adacache-moreg", "deltadit", "deltadit-port", "pab246", "pab357",
            "pab579", "teacache-slow", "teacache", "fbcache")


def bench(args) -> dict:
    weights = args.weights
    if weights is None and os.path.isfile(os.path.join(ROOT, "assets", "demo", "dit.safetensors")):
        weights = os.path.join(ROOT, "assets", "demo")
    base = ["progress=false", f"sampler.num_steps={args.steps}", f"model.weights={weights or 'null'}",
            *args.overrides]
    cfgs = {name: compose_config([*base, f"cache={name}"]) for name in args.policies}
    cfg0 = cfgs[args.policies[0]]
    device = resolve_device(cfg0.device)
    pipe = build_pipeline(cfg0.model, device, resolve_dtype(cfg0.model.dtype, device))
    prompts = HELDOUT_CAPTIONS[: args.prompts]
    dit = {n: [[] for _ in prompts] for n in args.policies}
    total = {n: [[] for _ in prompts] for n in args.policies}
    computed, fraction = {n: [] for n in args.policies}, {n: [] for n in args.policies}
    videos, reports = {n: [] for n in args.policies}, {}
    for r in range(args.repeats):
        for name, cfg in cfgs.items():
            job = assemble(cfg, pipe=pipe)  # this policy on the loaded model, taken off after
            for i, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                video, _, step_times = generate_one(job, cfg, prompt, prompt_seed(cfg.seed, i))
                total[name][i].append(time.perf_counter() - t0)
                dit[name][i].append(sum(step_times))  # the sampling steps: model calls, CFG, Euler
                if r == 0:
                    rep = job.policy.report()
                    computed[name].append(rep["num_computed"])
                    fraction[name].append(rep["computed_fraction"])
                    videos[name].append(to_uint8(video))
                    reports.setdefault(name, rep)
            job.release()
    rows = {}
    ref = videos.get("none")
    for name in args.policies:
        row = {
            "computed_fraction": float(np.mean(fraction[name])),
            "computed_steps_mean": float(np.mean(computed[name])),
            "computed_steps": computed[name],
            "dit_s": float(np.mean([min(v) for v in dit[name]])),
            "total_s": float(np.mean([min(v) for v in total[name]])),
            "pattern_first_prompt": reports[name]["pattern"],
            "bytes_held_peak": reports[name]["bytes_held_peak"],
        }
        if reports[name].get("codebook"):
            row["codebook"] = reports[name]["codebook"]["source"]
        if ref is not None:
            row["psnr_db"] = float(np.mean([min(judge.psnr(a, b), 100.0) for a, b in zip(videos[name], ref)]))
            row["ssim"] = float(np.mean([judge.ssim(a, b) for a, b in zip(videos[name], ref)]))
        rows[name] = row
    return {"weights": pipe.describe()["weights"], "steps": args.steps, "prompts": len(prompts),
            "repeats": args.repeats, "threads": torch.get_num_threads(), "device": str(device), "rows": rows}


def table(res: dict) -> str:
    base = res["rows"].get("none")
    lines = [f"weights: {res['weights']}; {res['steps']} steps; {res['prompts']} prompts x {res['repeats']} repeats "
             f"(min per video, mean over prompts); {res['threads']} thread(s) on {res['device']}",
             f"{'cache':<16}{'computed':>10}{'DiT s':>9}{'x':>7}{'total s':>9}{'x':>7}{'PSNR dB':>9}{'SSIM':>8}"
             f"{'held KiB':>10}"]
    for name, r in res["rows"].items():
        dx = base["dit_s"] / r["dit_s"] if base else float("nan")
        tx = base["total_s"] / r["total_s"] if base else float("nan")
        psnr = "-" if name == "none" else f"{r.get('psnr_db', float('nan')):.2f}"
        ssim = "-" if name == "none" else f"{r.get('ssim', float('nan')):.4f}"
        lines.append(f"{name:<16}{r['computed_fraction']:>10.3f}{r['dit_s']:>9.3f}{dx:>7.2f}{r['total_s']:>9.3f}"
                     f"{tx:>7.2f}{psnr:>9}{ssim:>8}{r['bytes_held_peak'] / 1024:>10.0f}")
    for name, r in res["rows"].items():
        lines.append(f"  {name}: fully computed steps per prompt {r['computed_steps']}, first prompt "
                     f"{r['pattern_first_prompt']}"
                     + (f", codebook: {r['codebook']}" if "codebook" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=4, help="held-out demo captions (seed = seed + index)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    ap.add_argument("--weights", default=None, help="a demo checkpoint directory (default: assets/demo, else random)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("overrides", nargs="*", help="generation overrides, e.g. seed=3")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = bench(args)
    print(table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
