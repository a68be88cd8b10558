"""Size check before the work (DESIGN principle 12, "refuse early").

`check(cfg, device, ...)` estimates from the run's shapes alone (nothing is built or loaded) the peak
memory of one process and the seconds per sampling step, raises `UserError` when the estimate does
not fit the memory available to this rank, and returns one-line warnings for runs that fit but will
be very slow. `estimate(cfg, ...)` gives the figures; `bench/estimate_check.py` compares them with
measured runs.

Memory model, per process (bytes; phases do not overlap, so the peak is the largest phase):
  weights     DiT parameters (+ Open-Sora VAE) in the run's dtype
  text        Open-Sora: T5-XXL in model.text_dtype, loaded at start and freed before sampling
  latents     LATENT_COPIES fp32 latents of this rank's share (z, the CFG pair in and out, CFG, Euler)
  activations ACTIVATION_COPIES hidden states (tokens x hidden_size, run dtype) of one forward of
              this rank's tokens: the CFG pair (halved by parallel.cfg=2), rows split by parallel.sp;
              times what the allocator holds beyond them (CUDA_RESERVE_FACTOR, CPU_HEAP_FACTOR)
  workspace   CPU: the kernels' first-call buffers, whatever the size (CPU_FIRST_CALL_BYTES)
  cache       hidden states a cache policy keeps between steps
  decoder     Open-Sora VAE decoder activations of one micro-batch of frames at full resolution
  video       the decoded video as float32 twice (to_uint8's chain) and as uint8 twice (frames, hash)
  peak = the largest of the PHASES sums
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from models.flops import stdit3_flops
from models.stdit3 import STDiT3Config, get_config
from runner.config import DTYPES, Config, UserError, resolve_device, resolve_dtype, resolve_presets

# Live hidden-state copies at the peak of one STDiT3 block under no_grad: residual input,
# modulated input, qkv (3), normed q and k, RoPE temporaries, attention output and projection;
# the MLP peaks at 10 (input, modulated, fc1 and GELU at 4 each). Chosen as an upper bound of the
# measured runs (bench/estimate_check.py: estimates 1.10-1.34x the peaks above the process baseline).
ACTIVATION_COPIES = 16
LATENT_COPIES = 6
# What the allocator holds beyond the live tensors. CPU: glibc serves blocks below its largest mmap
# threshold (32 MiB on 64-bit) from the heap, which keeps freed blocks: with hidden states below it
# the measured peaks were about twice the live tensors. CUDA: PyTorch's caching allocator reserved
# 1.25-1.36x the allocated peak on an H200 (bench/estimate_check.py --device cuda).
CPU_HEAP_BLOCK = 32 * 2**20
CPU_HEAP_FACTOR = 2
# Buffers the CPU kernels allocate at their first call whatever the size (thread pools, oneDNN
# scratch): a clean-clone CI run measured 143.3 MB for a step estimated at 138.9 MB without it.
CPU_FIRST_CALL_BYTES = 32 * 2**20
CUDA_RESERVE_FACTOR = 1.3
# Open-Sora parts counted by bench/param_counts.py (built on the meta device).
OPENSORA_VAE_PARAMS = 393_341_007
T5_XXL_PARAMS = 4_762_310_656
# The SDXL decoder's last stage: 128 channels at full resolution, six live tensors per ResNet block,
# micro-batches of 4 frames (models/vae.py MICRO_BATCH_SIZE). Not measured here (no weights).
VAE_DECODER_BYTES_PER_PIXEL = 6 * 128
VAE_MICRO_BATCH = 4
# Whole-model throughput relative to one square matmul (elementwise work, attention kernels). On
# the shared 2-core build CPU the demo ran at 0.1-1.4x the matmul rate measured just before it
# (bench/estimate_check.py): the other load moves faster than any estimate; 0.5 is a middle value.
# On an H200 the demo (hidden 96) ran at 0.08-0.3x of a 4096 matmul at its dtype and a random
# STDiT3-XL/2 at 0.27-0.3x (bench/estimate_check.py --device cuda).
MATMUL_EFFICIENCY = {"cpu": 0.5, "cuda": 0.2}
# Appended to the refusal: how to turn the check off (set by the caller that owns the switch).
SKIP_HINT = "; the estimate is an upper bound: check_memory=false skips this check"
SLOW_STEP_S = 60.0
SLOW_TOTAL_S = 30 * 60.0
GB = 1e9
PHASES = {
    "text encoding": ("weights", "text"),
    "sampling": ("weights", "latents", "activations", "workspace", "cache"),
    "decoding": ("weights", "latents", "decoder", "video"),
}


@dataclass
class Estimate:
    parts: dict[str, int]  # bytes, see the module docstring
    flops_per_step: int  # this rank's share of one forward of the CFG pair
    num_steps: int
    tokens: int  # video tokens of one forward on this rank
    efficiency: float  # the device's MATMUL_EFFICIENCY

    @property
    def phases(self) -> dict[str, int]:
        return {name: sum(self.parts[k] for k in parts) for name, parts in PHASES.items()}

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    @property
    def main_part(self) -> str:
        """The largest part of the peak phase."""
        return max(PHASES[self.peak_phase], key=lambda k: self.parts[k])

    def seconds_per_step(self, flops_per_s: float) -> float:
        return self.flops_per_step / (self.efficiency * flops_per_s)


def stdit3_param_count(c: STDiT3Config) -> int:
    """Parameters and buffers of models.stdit3.STDiT3 (tests compare it with a meta-device build)."""
    d, h, pn = c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    hd = d // c.num_heads
    lin = lambda i, o: i * o + o  # noqa: E731
    embed = (c.in_channels * pn * d + d + 2 * (lin(256, d) + lin(d, d)) + lin(d, 6 * d)
             + lin(c.caption_channels, d) + lin(d, d) + c.model_max_length * c.caption_channels
             + hd // 2 + d // 4)  # rope.freqs, pos_embed.inv_freq
    block = (lin(d, 3 * d) + 2 * hd + lin(d, d) + lin(d, d) + lin(d, 2 * d) + lin(d, d)
             + lin(d, h) + lin(h, d) + 6 * d)
    return embed + 2 * c.depth * block + lin(d, pn * c.out_channels) + 2 * d


def stored_params(directory: str) -> int | None:
    """Values in the .safetensors files of a directory, from their headers only (no tensor is read);
    None when there are none."""
    total, found = 0, False
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if not name.endswith(".safetensors"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (OSError, ValueError):
            return None
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
        found = True
    return total if found else None


def _opensora_part(cfg: Config, part: str, published: int) -> int:
    """Values of one Open-Sora part: counted from its files in model.weights_dir when they are there
    (a smaller model, or test weights), else the published model's."""
    if cfg.model.weights_dir:
        counted = stored_params(os.path.join(cfg.model.weights_dir, part))
        if counted is not None:
            return counted
    return published


def architecture(cfg: Config) -> STDiT3Config:
    """The STDiT3 configuration the pipeline will build, read without loading any weights."""
    m = cfg.model
    if m.family == "opensora-v1.2":
        if m.weights_dir:  # the loader builds what DIR/stdit3/config.json says
            try:
                with open(os.path.join(m.weights_dir, "stdit3", "config.json"), encoding="utf-8") as f:
                    return STDiT3Config.from_dict(json.load(f))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the loader reports a missing or bad part
        return get_config(m.arch)
    if m.weights is not None:
        from runner.families import resolve_weights

        try:
            with open(os.path.join(resolve_weights(m.weights), "config.json"), encoding="utf-8") as f:
                return STDiT3Config.from_dict(json.load(f)["stdit3"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # the loader reports the bad checkpoint; estimate with the named architecture
    if m.arch == "STDiT3-demo":
        from runner.families.demo import DEMO_ARCH

        return DEMO_ARCH
    return get_config(m.arch, in_channels=3, pred_sigma=False)  # pixel space, as runner.families.demo


def estimate(cfg: Config, sp: int = 1, cfg_parallel: int = 1, device: torch.device | None = None) -> Estimate:
    cfg = resolve_presets(cfg)
    device = device if device is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    size = torch.empty((), dtype=dtype).element_size()
    arch = architecture(cfg)
    frames, height, width = cfg.num_frames, cfg.height, cfg.width
    weights = stdit3_param_count(arch) * size
    text = decoder = 0
    if cfg.model.family == "opensora-v1.2":
        from models.vae import latent_size

        lat = latent_size(frames, height, width)
        weights += _opensora_part(cfg, "vae", OPENSORA_VAE_PARAMS) * size
        text = _opensora_part(cfg, "t5", T5_XXL_PARAMS) * DTYPES[cfg.model.text_dtype].itemsize
        decoder = VAE_DECODER_BYTES_PER_PIXEL * VAE_MICRO_BATCH * height * width * size
    else:
        lat = (frames, height, width)  # pixel space: the latent is the video
    pt, ph, pw = arch.patch_size
    tp, hp, wp = -(-lat[0] // pt), -(-lat[1] // ph), -(-lat[2] // pw)
    batch = 2 // cfg_parallel
    # DSP holds whole rows of every frame, or whole frames for spatial attention: the larger share.
    tokens = batch * max(tp * -(-hp // sp) * wp, -(-tp // sp) * hp * wp)
    hidden = tokens * arch.hidden_size * size
    held = CUDA_RESERVE_FACTOR if device.type == "cuda" else CPU_HEAP_FACTOR if hidden < CPU_HEAP_BLOCK else 1
    latent = arch.in_channels * lat[0] * lat[1] * lat[2] * 4
    cache = 0
    if cfg.cache.name == "pab":  # attention outputs of every block and kind, plus the broadcast MLPs
        cache = (4 * arch.depth + 2 * len(cfg.cache.pab_mlp_blocks) * cfg.cache.pab_mlp) * hidden
    elif cfg.cache.name != "none":  # an fp32 residual and a metric tensor
        cache = 2 * tokens * arch.hidden_size * 4
    video = 3 * frames * height * width * (2 * 4 + 2)
    parts = dict(weights=weights, text=text, latents=LATENT_COPIES * -(-latent // sp),
                 activations=int(ACTIVATION_COPIES * hidden * held),
                 workspace=CPU_FIRST_CALL_BYTES if device.type == "cpu" else 0, cache=cache, decoder=decoder,
                 video=video)
    flops = stdit3_flops(arch, 2, lat[0], lat[1], lat[2], arch.model_max_length).total
    efficiency = MATMUL_EFFICIENCY.get(device.type, MATMUL_EFFICIENCY["cpu"])
    return Estimate(parts, flops // (sp * cfg_parallel), cfg.sampler.num_steps, tokens, efficiency)


# ---- what is available -------------------------------------------------------------------------

def _cgroup_files(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> list[str]:
    """This process's cgroup memory limit files (v2 memory.max, v1 memory.limit_in_bytes), own and root."""
    files = [os.path.join(root, "memory.max"), os.path.join(root, "memory", "memory.limit_in_bytes")]
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    files.append(os.path.join(root, path.lstrip("/"), "memory.max"))
                elif "memory" in controllers.split(","):
                    files.append(os.path.join(root, "memory", path.lstrip("/"), "memory.limit_in_bytes"))
    except (OSError, ValueError):
        pass
    return files


def host_memory_limit(meminfo: str = "/proc/meminfo", cgroup_files: list[str] | None = None) -> int | None:
    """Bytes this machine can still give: MemAvailable, or a lower cgroup limit; None if unknown."""
    found = []
    try:
        with open(meminfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)  # kB
    except (OSError, ValueError, IndexError):
        pass
    for path in _cgroup_files() if cgroup_files is None else cgroup_files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" (v2) or about 2**63 (v1) mean no limit
            found.append(int(text))
    return min(found) if found else None


def available_memory(device: torch.device, local_ranks: int | None = None) -> tuple[int | None, str]:
    """(bytes for one rank, where the figure comes from); (None, ...) when it cannot be read.
    Both readings already exclude what this process holds (interpreter, torch), which the estimate leaves out."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {device}"
    ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    limit = host_memory_limit()
    where = "available host memory (MemAvailable or the cgroup limit)"
    if limit is None or ranks <= 1:
        return limit, where
    return limit // ranks, f"{where} shared by {ranks} local ranks"


def measure_throughput(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one square matmul at the run's dtype: the best of 3 after a warm-up (tens of ms)."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---- the check ---------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def check(cfg: Config, device: torch.device, sp: int = 1, cfg_parallel: int = 1, local_ranks: int | None = None,
          *, available: int | None = None, flops_per_s: float | None = None) -> list[str]:
    """Refuse (UserError) a run whose estimated peak exceeds this rank's memory; return warnings
    for one that will be very slow. `available` (bytes) and `flops_per_s` replace the readings."""
    cfg = resolve_presets(cfg)
    est = estimate(cfg, sp, cfg_parallel, device)
    where = "given limit"
    if available is None:
        available, where = available_memory(device, local_ranks)
    if available is not None and est.peak > available:
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in est.parts.items() if v)
        todo = "a smaller height/width/num_frames (or a smaller preset, e.g. preset=240p-2s)"
        if est.main_part == "text":
            todo = "model.text_dtype=bfloat16"
        elif est.main_part in ("activations", "latents", "cache"):
            todo += ", more ranks sharing the video with parallel.sp=N"
        if est.main_part != "text" and resolve_dtype(cfg.model.dtype, device).itemsize > 2:
            todo += ", or model.dtype=bfloat16"
        raise UserError(
            f"this run needs about {_gb(est.peak)} per process ({est.peak_phase}; mostly {est.main_part}: "
            f"{_gb(est.parts[est.main_part])} for {cfg.num_frames} frames of {cfg.height}x{cfg.width}, "
            f"{est.tokens:,} tokens per forward), but only {_gb(available)} is free ({where}). "
            f"Estimated parts: {parts}. Use {todo}{SKIP_HINT}."
        )
    rate = flops_per_s or measure_throughput(device, resolve_dtype(cfg.model.dtype, device))
    step_s = est.seconds_per_step(rate)
    total_s = step_s * est.num_steps
    if step_s <= SLOW_STEP_S and total_s <= SLOW_TOTAL_S:
        return []
    how = "a given throughput" if flops_per_s else f"a matmul measured now on {device}"
    return [f"this run will be slow: about {step_s:,.0f} s per step, {total_s / 60:,.0f} min for "
            f"{est.num_steps} steps ({est.flops_per_step / 1e12:,.2f} TFLOP per step at "
            f"{est.efficiency:g} x {rate / 1e9:,.0f} GFLOP/s from {how}); a smaller size, fewer "
            f"sampler.num_steps, a cache policy or a GPU make it faster."]
