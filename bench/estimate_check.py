"""Compare runner.estimate with measured runs of the random-weight demo model on this CPU.

Each size runs `python -m runner.generate model=demo-random prompt=x progress=false ...` in a fresh
process and reads the run report's peak resident memory (host_peak_rss_mb, the maximum over phases)
and step times. The process's fixed baseline (interpreter, torch, libraries) is the smallest run's
peak minus its estimate; the ratio is estimate / (measured peak - baseline), which should lie in
[1, 2]. Keep the sizes modest: the machine is shared.

    python bench/estimate_check.py                      # the default sizes, 1 step each
    python bench/estimate_check.py --sizes 32x32x16 64x64x64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from runner.config import register_configs  # noqa: E402
from runner.estimate import estimate, measure_throughput  # noqa: E402

# height x width x frames; the first is the baseline. Token counts (CFG pair, patch 4x4):
# 2k, 33k, 131k (wide rows), 131k (square frames), 262k.
SIZES = ["32x32x16", "64x64x64", "32x256x128", "128x128x64", "64x64x512"]


def overrides(size: str, steps: int, extra: list[str]) -> list[str]:
    h, w, f = size.split("x")
    return ["model=demo-random", "prompt=x", f"sampler.num_steps={steps}", "progress=false",
            f"height={h}", f"width={w}", f"num_frames={f}", *extra]


def estimated(args: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=args))
    return estimate(cfg, device=torch.device("cpu"))


def measured(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, PYTHONPATH=ROOT)
        run = subprocess.run([sys.executable, "-m", "runner.generate", *args, f"output_dir={out}"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"run failed ({' '.join(args)}):\n{run.stderr[-2000:]}")
        reports = [n for n in os.listdir(out) if n.endswith(".json")]  # the one report, whatever its name
        with open(os.path.join(out, reports[0]), encoding="utf-8") as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=SIZES, help="HxWxF, the first is the baseline")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. model.dtype=bfloat16")
    a = ap.parse_args()
    print(f"{'size HxWxF':<12} {'tokens':>8} {'est MB':>8} {'meas MB':>8} {'meas-base':>9} {'ratio':>6} "
          f"{'est s/step':>10} {'meas s/step':>11} {'matmul GF/s':>11}")
    base = None
    for size in a.sizes:
        args = overrides(size, a.steps, a.extra)
        est = estimated(args)
        rate = measure_throughput(torch.device("cpu"), torch.float32)  # just before the run: the load now
        rep = measured(args)
        peak = rep["memory"]["host_peak_rss_mb"] * 2**20
        step_s = max(rep["step_times_s"])
        if base is None:
            base = peak - est.peak
        above = peak - base
        ratio = f"{est.peak / above:6.2f}" if size != a.sizes[0] else f"{'base':>6}"
        print(f"{size:<12} {est.tokens:>8} {est.peak / 1e6:>8.0f} {peak / 1e6:>8.0f} {above / 1e6:>9.0f} {ratio} "
              f"{est.seconds_per_step(rate):>10.1f} {step_s:>11.1f} {rate / 1e9:>11.1f}", flush=True)
    print(f"baseline (smallest run's peak - its estimate): {base / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
