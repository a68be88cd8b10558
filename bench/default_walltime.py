"""Wall time of the default generation on this machine, process start included.

    python bench/default_walltime.py [--runs 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "runner.generate", "prompt=a red circle moves left on a dark background",
                 f"output_dir={out}/{i}", "progress=false", *args.overrides],
                cwd=ROOT, check=True, capture_output=True,
            )
            times.append(time.perf_counter() - t0)
    print(f"default generation, process start included, {args.runs} runs: "
          f"median {statistics.median(times):.2f} s, min {min(times):.2f} s, max {max(times):.2f} s "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
