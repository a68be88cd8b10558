"""Wall time of the default generation on this machine, process start included, and its sampling
time (the run report's `sampling_s`), for one or more OpenMP wait policies run in turn.

    python bench/default_walltime.py [--runs 3]
    python bench/default_walltime.py --runs 3 --policies library PASSIVE --busy 1

`--policies`: OMP_WAIT_POLICY values to compare, interleaved run by run; `library` runs with
OMP_WAIT_POLICY set to the empty string, which libgomp ignores (its own default: spin, then sleep),
and `runner` leaves the variable unset (SkipSync's default, runner/__init__.py). `--busy N` keeps
N other processes spinning on the CPU meanwhile, as on a shared machine.
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
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    times = {p: [] for p in args.policies}
    try:
        with tempfile.TemporaryDirectory() as out:
            for i in range(args.runs):
                for policy in args.policies:
                    times[policy].append(run_once(policy, f"{out}/{policy}-{i}", args.overrides))
    finally:
        stop.set()
        for p in spinners:
            p.join()
    print(f"default generation, {args.runs} runs per policy, interleaved, {args.busy} busy processes, "
          f"{os.cpu_count()} CPUs:")
    for policy, rows in times.items():
        wall, sampling = [r[0] for r in rows], [r[1] for r in rows]
        print(f"  OMP_WAIT_POLICY {policy:<8} wall min {min(wall):.2f} s, median {statistics.median(wall):.2f} s; "
              f"sampling min {min(sampling):.2f} s, median {statistics.median(sampling):.2f} s")


if __name__ == "__main__":
    main()
