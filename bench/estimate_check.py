"""Compare runner.estimate with measured runs of the random-weight demo model on this CPU.

Each size runs `python -m runner.generate model=demo-random prompt=x progress=false ...` in a fresh
process and reads the run report's peak resident memory (host_peak_rss_mb, the maximum over phases)
and step times. The process's fixed baseline (interpreter, torch, libraries) is the smallest run's
peak minus its estimate; the ratio is estimate / (measured peak - baseline), which should lie in
[1, 2]. Keep the sizes modest: the machine is shared.

    python bench/estimate_check.py                      # the default sizes, 1 step each
    python bench/estimate_check.py --sizes 32x32x16 64x64x64 --steps 2
    python bench/estimate_check.py --device cuda    # in one process: CUDA peaks of 2 sampler steps

With --device, each case runs two sampler steps of the model in this process and compares the
sampling part of the estimate (latents + activations) with the peaks of torch.cuda's allocated and
reserved memory above the loaded model, and the estimated seconds per step (from the measured
matmul) with the second step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from runner.config import UserError, register_configs, resolve_dtype, resolve_presets  # noqa: E402
from runner.estimate import check, estimate, measure_throughput  # noqa: E402

# height x width x frames; the first is the baseline. Token counts (CFG pair, patch 4x4):
# 2k, 33k, 131k (wide rows), 131k (square frames), 262k.
SIZES = ["32x32x16", "64x64x64", "32x256x128", "128x128x64", "64x64x512"]
# --device: the shipped demo model at the issue's sizes, and its refusals.
CASES = ["preset=240p-2s", "preset=240p-2s model.dtype=bfloat16", "preset=480p-2s",
         "preset=480p-2s model.dtype=bfloat16", "preset=720p-2s model.dtype=bfloat16",
         "preset=720p-4s model.dtype=bfloat16", "height=100000 width=100000",
         # STDiT3-XL/2 (random, pixel space) on the token grids of Open-Sora's 240p 2s and 720p 4s latents
         "model=demo-random model.arch=STDiT3-XL/2 model.dtype=bfloat16 height=30 width=53 num_frames=15",
         "model=demo-random model.arch=STDiT3-XL/2 model.dtype=bfloat16 height=90 width=160 num_frames=30"]


def overrides(size: str, steps: int, extra: list[str]) -> list[str]:
    h, w, f = size.split("x")
    return ["model=demo-random", "prompt=x", f"sampler.num_steps={steps}", "progress=false",
            f"height={h}", f"width={w}", f"num_frames={f}", *extra]


def config(args: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return resolve_presets(OmegaConf.to_object(compose(config_name="config", overrides=args)))


def estimated(args: list[str]):
    return estimate(config(args), device=torch.device("cpu"))


def in_process(device: torch.device, cases: list[str]) -> None:
    from runner.families import build_pipeline
    from runner.sampler import SamplerSettings, make_timesteps, sample

    print(f"{'case (last 40 characters)':<40} {'tokens':>9} {'est GB':>7} {'alloc GB':>8} {'ratio':>6} "
          f"{'res GB':>7} {'ratio':>6} "
          f"{'est s/step':>10} {'meas s/step':>11}  check")
    for case in cases:
        cfg = config(case.split())
        est = estimate(cfg, device=device)
        try:
            verdict = "; ".join(check(cfg, device)) or "ok"
        except UserError as e:
            print(f"{case[-40:]:<40} {est.tokens:>9} {est.peak / 1e9:>7.1f}  refused: {str(e)[:160]}...", flush=True)
            continue
        dtype = resolve_dtype(cfg.model.dtype, device)
        pipe = build_pipeline(cfg.model, device, dtype)
        cond = pipe.encode_text(["a red circle moves left"]).to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        s = SamplerSettings(num_steps=2, use_timestep_transform=False)
        times = []

        def on_step(i, phase):
            torch.cuda.synchronize(device)
            times.append(time.perf_counter())

        z = torch.randn(1, *pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width), device=device)
        with torch.no_grad():  # as runner.generate samples
            sample(lambda x, t, i: pipe.dit(x, t, cond.y, cond.mask), z, s,
                   make_timesteps(s, cfg.height, cfg.width, cfg.num_frames), pipe.latent_channels, on_step=on_step)
        peak = torch.cuda.max_memory_allocated(device) - base
        reserved = torch.cuda.max_memory_reserved(device) - base_reserved
        bound = est.parts["latents"] + est.parts["activations"]
        rate = measure_throughput(device, dtype)
        print(f"{case[-40:]:<40} {est.tokens:>9} {bound / 1e9:>7.2f} {peak / 1e9:>8.2f} {bound / peak:>6.2f} "
              f"{reserved / 1e9:>7.2f} {bound / reserved:>6.2f} {est.seconds_per_step(rate):>10.2f} "
              f"{times[3] - times[2]:>11.2f}  {verdict}", flush=True)
        del pipe, cond, z
        torch.cuda.empty_cache()


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
    ap.add_argument("--device", help="cuda: measure in this process (CASES, or --cases)")
    ap.add_argument("--cases", nargs="+", default=CASES, help='with --device: override strings, e.g. "preset=240p-2s"')
    a = ap.parse_args()
    if a.device:
        return in_process(torch.device(a.device), a.cases)
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
