"""Seconds per sampling step of STDiT3 (random weights): one computed step (all blocks) and one
AdaCache reused step (embed + cached residual + final layer), with torch.compile off and on.

    python bench/step_time.py                                  # CUDA: STDiT3-XL/2, 480p 2s, bf16
    python bench/step_time.py --compile off --repeats 10       # eager only
    python bench/step_time.py --peak-tflops 989                # a device the peak table lacks
    python bench/step_time.py --device cpu                     # small configuration (seconds)

On the project's GPU machine (the `device` tool's `run`): its python3 has a CUDA torch but not
hydra-core, omegaconf or antlr4 (runner.config needs them). They are pure Python, so copy them from
this checkout's venv into an ignored folder once, here:

    mkdir -p .pydeps && cp -r .venv/lib/python3.11/site-packages/{hydra,omegaconf,antlr4} .pydeps/
    echo /.pydeps/ >> .git/info/exclude

then run(carry=[".pydeps"], timeout_s=480,
         command="PYTHONPATH=.pydeps PYTHONUNBUFFERED=1 python3 bench/step_time.py")
(building the model, the eager steps and the compilation take a few minutes in all).

480p-2s: STDiT3-XL/2 on the latent 4 x 15 x 60 x 106 of Open-Sora's 4x8x8 VAE (51 frames of
480x854), the CFG pair (batch 2), 300 text tokens of 4096 channels, all valid. Attention is the
model's own F.scaled_dot_product_attention (the runner's only attention). Defaults: CUDA runs
480p-2s in bf16 with compile off and on; without CUDA a small configuration (the STDiT3-demo
architecture at the demo-random size, fp32, compile off: inductor is slow on a small CPU) runs.

The steps run through the runner's own assembly (runner/assemble.py `assemble`, cache=adacache,
`compile` as the job's flag) and its model call (`Job.denoise`), with the DiT alone as the pipeline
(no VAE or T5: they take no part in a step). AdaCache gets a fixed codebook of rate 2, so after its
two opening computed steps the generation alternates reused and computed steps whatever the
random weights' metric says; a computed step includes the policy's metric and decision, as in a
run. Each timed step is bracketed by torch.cuda.synchronize. The first 2 + 2 x warmup steps
(compilation included) are not timed; then `repeats` reused and `repeats` computed steps are.
Under compile the one block whose branch AdaCache taps stays eager (runner/assemble.py
`compile_blocks`); the others are compiled.

FLOPs: models/flops.py `stdit3_flops` (a forward of the CFG pair). Fraction of peak: against the
device's dense bf16 tensor-core peak from PEAK_TFLOPS by device name, or --peak-tflops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models.flops import stdit3_flops  # noqa: E402
from models.stdit3 import build_stdit3, get_config  # noqa: E402
from runner.assemble import assemble  # noqa: E402
from runner.cache import AdaCacheConfig  # noqa: E402
from runner.config import Config, resolve_device, resolve_dtype  # noqa: E402
from runner.families.demo import DEMO_ARCH  # noqa: E402
from runner.sampler import StepInfo  # noqa: E402

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; the sparsity figures are twice these).
# First match of a name fragment in torch.cuda.get_device_name() wins, so variants come first.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]

# name: (arch, latent (C, T, H, W), pixel (height, width) for the position scale, text tokens)
SIZES = {
    "480p-2s": (get_config("STDiT3-XL/2"), (4, 15, 60, 106), (480, 854), 300),
    "small": (DEMO_ARCH, (3, 16, 32, 32), (32, 32), DEMO_ARCH.model_max_length),
}


class DiTOnly:
    """The part of a pipeline that `assemble` and a step touch: the DiT and the latent shape."""

    def __init__(self, dit, latent_shape):
        self.dit, self._shape = dit, tuple(latent_shape)

    def latent_shape(self, num_frames, height, width):
        return self._shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for a CPU; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table entry {key!r}"
    return None, f"{name!r} is not in the table; pass --peak-tflops"


@torch.no_grad()
def time_steps(pipe, cfg: Config, device, dtype, inputs, warmup: int, repeats: int):
    """-> (seconds of the timed computed steps, of the timed reused steps, seconds of the first step)."""
    job = assemble(cfg, device, dtype, pipe=pipe)
    x, y, mask, kwargs = inputs
    first, n = 2 + 2 * warmup, 2 + 2 * (warmup + repeats) + 1  # +1: the last step (computed, frees the cache)
    times, kinds = [], []
    try:
        for i in range(n):
            t = 1000.0 * (1 - i / n)
            t_in = torch.full((x.shape[0],), t, device=device, dtype=torch.float32)
            sync(device)
            t0 = time.perf_counter()
            out = job.denoise(x, t_in, y, mask, StepInfo(i, n, t), **kwargs)
            sync(device)
            times.append(time.perf_counter() - t0)
            kinds.append(job.policy.computed[i])
    finally:
        job.release()
    window = range(first, n - 1)
    computed = [times[i] for i in window if kinds[i]]
    reused = [times[i] for i in window if not kinds[i]]
    expected = 2 * repeats if cfg.cache.name == "none" else repeats
    if len(computed) != expected:  # the fixed codebook should make this impossible
        pattern = "".join("C" if k else "R" for k in kinds)
        raise RuntimeError(f"unexpected {cfg.cache.name} pattern {pattern}: cannot time {repeats} steps of each kind")
    if not torch.isfinite(out).all():
        print("warning: the output is not finite (random weights); the times still hold", file=sys.stderr)
    return computed, reused, times[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto",
                    help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32, ...")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 480p-2s on CUDA, small on CPU")
    ap.add_argument("--compile", choices=("off", "on", "both"), default=None, help="default: both on CUDA, off on CPU")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind after the two opening ones")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps of each kind")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, overriding the table")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        ap.error("--warmup must be >= 0 and --repeats >= 1")

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device)
    size = args.size or ("480p-2s" if cuda else "small")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if cuda else "off")]
    arch, latent, (height, width), text_len = SIZES[size]
    if not cuda and args.size is None:
        print(f"no CUDA: small configuration (STDiT3-demo arch, latent {'x'.join(map(str, latent))}, "
              f"{text_len} text tokens, {str(dtype).replace('torch.', '')}); --size 480p-2s for the full one")

    t0 = time.perf_counter()
    # The runner's random weights (models/stdit3.py init_weights), drawn on the CPU, then moved.
    dit = build_stdit3(arch, device=device, dtype=dtype, seed=args.seed).eval()
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn((1, *latent), generator=gen)
    x = torch.cat([z, z], 0).to(device)  # the CFG pair, as runner.sampler.sample builds it
    # Text as the runner hands it over: [cond; null] in fp32 (T5's dtype), the cond mask (long).
    y = torch.randn((2, text_len, arch.caption_channels), generator=gen).to(device)
    mask = torch.ones((1, text_len), dtype=torch.long, device=device)
    inputs = (x, y, mask, dict(fps=24, height=height, width=width))
    pipe = DiTOnly(dit, latent)

    flops = stdit3_flops(arch, batch=2, frames=latent[1], height=latent[2], width=latent[3], text_len=text_len)
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device {name} ({device}), torch {torch.__version__}, {str(dtype).replace('torch.', '')}, size {size}: "
          f"depth {arch.depth}, hidden {arch.hidden_size}, latent 2x{'x'.join(map(str, latent))}, "
          f"{text_len} text tokens; model built in {build_s:.1f} s")
    print(f"computed step: {flops.total / 1e12:.3f} TFLOP (models/flops.py); peak: "
          f"{'unknown' if peak is None else f'{peak:g} TFLOP/s'} ({peak_src}); "
          f"{args.warmup} warm-up and {args.repeats} timed steps of each kind")
    if peak is not None and dtype not in (torch.bfloat16, torch.float16) and args.peak_tflops is None:
        print(f"note: the peak is the bf16 one and this run is {dtype}")

    for compiled in modes:
        tag = f"compile={'on' if compiled else 'off':<3}"
        cfg = Config(cache=AdaCacheConfig(codebook_thresholds=[], codebook_rates=[2]), compile=compiled,
                     device=str(device), num_frames=latent[1], height=height, width=width)
        computed, reused, first_s = time_steps(pipe, cfg, device, dtype, inputs, args.warmup, args.repeats)
        c_min, c_med = min(computed), statistics.median(computed)
        tflops = flops.total / c_med / 1e12
        frac = "n/a" if peak is None else f"{tflops / peak:.1%} of peak"
        print(f"{tag} computed  min {c_min:.4f} s  median {c_med:.4f} s  {tflops:8.2f} TFLOP/s  {frac}  "
              f"(cache={cfg.cache.name}, first step {first_s:.2f} s)")
        if reused:
            r_min, r_med = min(reused), statistics.median(reused)
            print(f"{tag} reused    min {r_min:.4f} s  median {r_med:.4f} s  {r_med / c_med:.1%} of the computed step")
    if cuda:
        print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
