"""Wall time of the default generation on this machine, process start included, and its sampling
time (the run report's `sampling_s`), for one or more OpenMP wait policies run in turn.

    python bench/default_walltime.py [--runs 3]
    python bench/default_walltime.py --runs 3 --policies library PASSIVE --busy 1
    python bench/default_walltime.py --runs 5 --weights builtin:demo runs/train_demo

`--policies`: OMP_WAIT_POLICY values to compare, interleaved run by run; `library` runs with
OMP_WAIT_POLICY set to the empty string, which libgomp ignores (its own default: spin, then sleep),
and `runner` leaves the variable unset (SkipSync's default, runner/__init__.py). `--busy N` keeps
N other processes spinning on the CPU meanwhile, as on a shared machine. `--weights`: demo
checkpoints to compare (each with every policy, interleaved); the ratios to the first are printed.
Hydra overrides go before the options (`... sampler.num_steps=3 --weights A B`).
"""

import argparse
import glob
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spin(stop):
    while not stop.is_set():
        pass


def run_once(policy: str, out: str, overrides) -> tuple[float, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "runner":
        env["OMP_WAIT_POLICY"] = "" if policy == "library" else policy
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "runner.generate", "prompt=a red circle moves left on a dark background",
         f"output_dir={out}", "progress=false", *overrides],
        cwd=ROOT, check=True, capture_output=True, env=env,
    )
    wall = time.perf_counter() - t0
    with open(glob.glob(os.path.join(out, "*.json"))[0], encoding="utf-8") as f:
        return wall, json.load(f)["timings"]["sampling_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=["runner"])
    ap.add_argument("--busy", type=int, default=0, help="other processes kept spinning meanwhile")
    ap.add_argument("--weights", nargs="+", default=[None], help="model.weights values to compare")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    if any(w is not None and "=" in w for w in args.weights):
        ap.error("an override after --weights: put Hydra overrides before the options")
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    variants = [(p, w) for w in args.weights for p in args.policies]
    times = {v: [] for v in variants}
    try:
        with tempfile.TemporaryDirectory() as out:
            for i in range(args.runs):
                for j, (policy, weights) in enumerate(variants):
                    extra = [] if weights is None else [f"model.weights={weights}"]
                    times[policy, weights].append(run_once(policy, f"{out}/{j}-{i}", [*extra, *args.overrides]))
    finally:
        stop.set()
        for p in spinners:
            p.join()
    print(f"default generation, {args.runs} runs per policy, interleaved, {args.busy} busy processes, "
          f"{os.cpu_count()} CPUs:")
    first = times[variants[0]]
    for (policy, weights), rows in times.items():
        wall, sampling = [r[0] for r in rows], [r[1] for r in rows]
        name = f"OMP_WAIT_POLICY {policy:<8}" + ("" if weights is None else f" weights {weights}")
        print(f"  {name} wall min {min(wall):.2f} s, median {statistics.median(wall):.2f} s; "
              f"sampling min {min(sampling):.2f} s, median {statistics.median(sampling):.2f} s")
        if rows is not first:  # per run against the first variant's run of the same round
            for i, label in ((0, "wall"), (1, "sampling")):
                ratios = [r[i] / f[i] for r, f in zip(rows, first)]
                print(f"    {label} / first variant's: min {min(ratios):.2f}, median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
