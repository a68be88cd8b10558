"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

The YAML files under conf/ are merged onto `Config`, so an unknown key or a wrong type fails at
load time. `validate` turns impossible values into one `UserError` that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from hydra.core.config_store import ConfigStore


# The Hydra configs; a path from this file, so the console script finds them from any directory and
# in an installed (non-editable) package, where conf/ is installed beside runner/.
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


class UserError(ValueError):
    """Bad input from the person running the job: printed as one paragraph, exit code 2."""


@dataclass
class ModelConfig:
    """Which model to run and where its weights come from."""

    # "demo": pixel space with the small built-in text encoder.
    # "opensora-v1.2": STDiT3-XL/2 + Open-Sora VAE 1.2 + T5-XXL from weights_dir.
    family: str = "demo"
    # STDiT3 size name (models.stdit3.CONFIGS); ignored when the weights carry a config.json.
    arch: str = "STDiT3-demo"
    # demo: a local checkpoint, a directory (config.json + safetensors) or a .safetensors file.
    # None means random weights drawn from init_seed (said plainly in the output and report).
    weights: Optional[str] = None
    init_seed: int = 0
    # float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU). DiT and VAE.
    dtype: str = "float32"
    # opensora-v1.2: a local directory with the published parts in their Hugging Face layouts,
    # DIR/stdit3 (hpcai-tech/OpenSora-STDiT-v3), DIR/vae (hpcai-tech/OpenSora-VAE-v1.2) and
    # DIR/t5 (DeepFloyd/t5-v1_1-xxl). Nothing is downloaded.
    weights_dir: Optional[str] = None
    # T5 precision (float32 | bfloat16 | float16); Open-Sora runs it in float32.
    text_dtype: str = "float32"
    # Prompt suffixes Open-Sora 1.2 was trained with: " aesthetic score: 6.5." and, if set,
    # " motion score: x."; null leaves them out. Ignored by the demo.
    aes: Optional[float] = 6.5
    flow: Optional[float] = None


@dataclass
class SamplerConfig:
    name: str = "rflow"
    num_steps: int = 30
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = 1000
    # Fixed transform ratio instead of the size-dependent one (set by conf/model/demo.yaml).
    timestep_shift: Optional[float] = None


@dataclass
class ParallelSettings:
    """The dp x cfg x sp mesh and the sequence-parallel layout (see runner/distributed.py).

    dp * cfg * sp must equal the number of processes (torchrun's WORLD_SIZE, 1 without torchrun);
    one of them may be -1 to take the rest.
    """

    dp: int = 1  # prompt groups: prompts are dealt round-robin to the dp groups
    cfg: int = 1  # 2: the conditional and unconditional CFG halves on different ranks
    sp: int = 1  # sequence parallelism: ranks sharing one video's tokens
    layout: str = "dsp"  # dsp | ulysses
    backend: str = "auto"  # auto: nccl on CUDA devices, gloo on the CPU
    timeout_s: float = 300.0  # any collective (and a silent rank) waited on longer than this fails the job


@dataclass
class CacheConfig:
    """Feature caching (runner/cache): conf/cache/*.yaml (none, adacache, adacache-slow, adacache-moreg,
    teacache, teacache-slow, fbcache, deltadit, deltadit-port, pab246, pab357, pab579)."""

    # none | adacache | teacache | fbcache | deltadit | pab
    name: str = "none"
    # fast | slow: which published AdaCache codebook; for TeaCache the threshold delta (0.2 | 0.1).
    speed: str = "fast"
    # Use the published codebook of this many steps (30 or 100); null: the one of sampler.num_steps,
    # or the nearest published step count (reported as approximate).
    codebook_steps: Optional[int] = None
    # A custom codebook instead: rate codebook_rates[i] for the first i with distance < thresholds[i],
    # else codebook_rates[-1] (one more rate than thresholds).
    codebook_thresholds: Optional[List[float]] = None
    codebook_rates: Optional[List[int]] = None
    # Layers whose residual gives the metric; null: the middle layer depth//2 - 1 (13 of 28, as released).
    cache_loc: Optional[List[int]] = None
    # t-attn | s-attn | ca-mlp
    cache_res: str = "t-attn"
    # Motion regularisation (MoReg) as released.
    moreg: bool = False
    # [first, last] 1-based steps; null: (4, 26) for 30 steps, (10, 90) for 100, scaled for others.
    moreg_window: Optional[List[int]] = None
    moreg_strides: List[int] = field(default_factory=lambda: [1])
    moreg_norm: float = 0.385
    moreg_power: float = 8.0
    moreg_div: float = 1.0
    mograd_mul: float = 10.0
    # false: the "MoReg without gradient" ablation.
    moreg_grad: bool = True
    # Debug: gather every rank's decision each computed step and fail loudly on any mismatch
    # (the content-adaptive policies: adacache, teacache, fbcache).
    verify_agreement: bool = False

    # -- TeaCache: accumulated rescaled relative L1 of block 0's modulated input against delta.
    # delta; null: 0.1 for speed=slow, 0.2 for speed=fast (the published Open-Sora settings).
    teacache_thresh: Optional[float] = None
    # The rescaling polynomial, highest power first (default: the published Open-Sora 1.2 fit).
    teacache_coefficients: List[float] = field(default_factory=lambda: [
        2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02])

    # -- First-Block-Cache: reuse the tail residual while layer 0's residual changes less than this
    # (relative L1 against the last computed step; diffusers' default 0.05).
    fbcache_threshold: float = 0.05

    # -- Delta-DiT: Delta-Cache of a contiguous span of blocks (counted over both kinds: 56 for
    # Open-Sora, spatial 0, temporal 0, spatial 1, ...).
    # paper: rear span during the first b steps, front span after, refresh every N steps and at the
    # switch. port: the PAB authors' Open-Sora port (deltadit_port_*).
    deltadit_rule: str = "paper"
    # Target speed-up over block MACs; gives N = ceil(s) and N_c = ceil(N/(N-1) (N_b - N_b/s)).
    deltadit_speedup: float = 1.6
    # N (refresh period) and N_c (span length in blocks) directly; both or neither (then the speed-up).
    deltadit_interval: Optional[int] = None
    deltadit_span: Optional[int] = None
    # Outline-stage steps that use the rear span; null: round(0.6 * steps) (the paper's 12 of 20).
    deltadit_b: Optional[int] = None
    # I_front, the first block of the front span (the rear span ends at the last block).
    deltadit_front_start: int = 0
    # port: steps [first, last] in which every gap-th step (counted from first, 1-based) skips the
    # ST-layers [first, last] (both kinds of block); all other steps refresh.
    deltadit_port_steps: List[int] = field(default_factory=lambda: [0, 5])
    deltadit_port_layers: List[int] = field(default_factory=lambda: [0, 5])
    deltadit_port_gap: int = 2
    # Add h_in - h_out instead of h_out - h_in: the port's sign (a likely bug), to reproduce its numbers.
    deltadit_negate: bool = False

    # -- PAB (pyramid attention broadcast): reuse an attention output while lo < t < hi (bf16 t,
    # strict) and step % range != 0; ranges for spatial, temporal, cross (PAB246: 2, 4, 6).
    pab_ranges: List[int] = field(default_factory=lambda: [2, 4, 6])
    pab_window: List[float] = field(default_factory=lambda: [450.0, 930.0])
    # MLP broadcast: at int(t) in keys the listed layers' MLPs (both kinds) store, the next `skip` steps reuse.
    pab_mlp: bool = True
    pab_mlp_keys: List[int] = field(default_factory=lambda: [676, 788, 864])
    pab_mlp_blocks: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pab_mlp_skip: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # One prompt, or a file with one prompt per line (blank lines and lines starting with # skipped).
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    seed: int = 42
    num_frames: int = 16
    height: int = 32
    width: int = 32
    fps: int = 24
    # Open-Sora presets (runner/presets.py); when set they replace height/width (resolution, with
    # aspect_ratio written H:W, "9:16" = landscape, the default) and num_frames (duration: 2s=51,
    # 4s=102, 8s=204, 16s=408 or a frame count). The preset group sets them: preset=720p-4s.
    resolution: Optional[str] = None
    aspect_ratio: Optional[str] = None
    duration: Optional[str] = None
    output_dir: str = "outputs"
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # Show a per-step progress bar on stderr.
    progress: bool = True
    # Also save the final latent (before decoding) as <name>.latent.pt, for comparisons.
    save_latent: bool = False
    # Estimate the run's memory and time from its shapes before loading anything (runner/estimate.py):
    # refuse what cannot fit, warn about what will be very slow. false skips the check.
    check_memory: bool = True


FAMILIES = ("demo", "opensora-v1.2")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes as distinct seeds


def device_problem(name: str) -> str | None:
    if not _DEVICE.fullmatch(name):
        return f"device={name!r} is not known; use auto, cpu, cuda or cuda:N"
    return None


def resolve_device(name: str) -> torch.device:
    problem = device_problem(name)
    if problem:
        raise UserError(problem + ".")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was requested but CUDA is not available; use device=cpu or device=auto.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1} or device=cuda.")
    return dev


def check_seeds(seed: int, num_prompts: int) -> None:
    """Prompt i uses seed + i: every one must be a distinct generator seed (0 to 2^64 - 1)."""
    lo, hi = SEED_RANGE
    last = seed + num_prompts - 1
    if seed < lo or last > hi:
        span = f"seed={seed}" if num_prompts == 1 else f"seed={seed} (to {last} over {num_prompts} prompts)"
        raise UserError(f"{span} is outside the generator's range 0 to 2^64-1 = {hi}; choose a smaller seed.")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"model.dtype={name} is not known; use one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def read_prompts(cfg: Config) -> list[str]:
    """The prompts to generate, in order. Exactly one of prompt / prompts_file must be given."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise UserError("both prompt and prompts_file are set; give only one of them.")
    if cfg.prompts_file is not None:
        try:
            with open(cfg.prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise UserError(
                f"cannot read prompts_file={cfg.prompts_file!r} ({e.strerror}); "
                "give a readable text file with one prompt per line."
            ) from None
        except UnicodeDecodeError as e:
            raise UserError(
                f"prompts_file={cfg.prompts_file!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                f"offset {e.start}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8."
            ) from None
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise UserError(f"prompts_file={cfg.prompts_file!r} has no prompts; write one prompt per line.")
        return prompts
    if cfg.prompt is None or not cfg.prompt.strip():
        raise UserError('the prompt is empty; pass prompt="a red circle moves left" or prompts_file=FILE.')
    return [cfg.prompt.strip()]


def resolve_presets(cfg: Config) -> Config:
    """A copy of cfg with resolution/aspect_ratio/duration turned into height/width/num_frames."""
    from runner import presets

    changes = {}
    try:
        if cfg.resolution is not None:
            changes["height"], changes["width"] = presets.image_size(cfg.resolution, cfg.aspect_ratio or "9:16")
        elif cfg.aspect_ratio is not None:
            raise ValueError(f"aspect_ratio={cfg.aspect_ratio} needs a resolution (e.g. resolution=720p)")
        if cfg.duration is not None:
            changes["num_frames"] = presets.num_frames(cfg.duration)
    except ValueError as e:
        raise UserError(f"{e}.") from None
    return dataclasses.replace(cfg, **changes)


def validate(cfg: Config) -> None:
    """Value checks that do not need the model; run before anything heavy (or any collective)."""
    problems = []
    m = cfg.model
    if m.family not in FAMILIES:
        problems.append(f"model.family={m.family!r} is not known; use model=demo or model=opensora-v1.2")
    if m.family == "opensora-v1.2":
        if m.weights_dir is None:
            problems.append(
                "model=opensora-v1.2 needs model.weights_dir=DIR, a local directory with the published weights in "
                "DIR/stdit3, DIR/vae and DIR/t5 (e.g. huggingface-cli download hpcai-tech/OpenSora-STDiT-v3 "
                "--local-dir DIR/stdit3; the full list is printed when a part is missing)"
            )
        if min(cfg.height, cfg.width) < 8:
            problems.append(f"the Open-Sora VAE needs height and width >= 8 (got {cfg.height}x{cfg.width})")
    elif m.weights_dir is not None:
        problems.append("model.weights_dir is for model=opensora-v1.2; the demo model takes model.weights")
    if m.text_dtype not in DTYPES:
        problems.append(f"model.text_dtype={m.text_dtype} is not known; use one of: {', '.join(DTYPES)}")
    if cfg.num_frames < 1:
        problems.append(f"num_frames must be >= 1 (got {cfg.num_frames})")
    if cfg.height < 1 or cfg.width < 1:
        problems.append(f"height and width must be >= 1 (got {cfg.height}x{cfg.width})")
    if cfg.sampler.num_steps < 1:
        problems.append(f"sampler.num_steps must be >= 1 (got {cfg.sampler.num_steps})")
    if cfg.fps < 1:
        problems.append(f"fps must be >= 1 (got {cfg.fps})")
    if not math.isfinite(cfg.sampler.cfg_scale):
        problems.append(f"sampler.cfg_scale must be a finite number (got {cfg.sampler.cfg_scale})")
    shift = cfg.sampler.timestep_shift
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        problems.append(f"sampler.timestep_shift must be a finite number > 0 or null (got {shift})")
    if cfg.sampler.num_timesteps < 1:
        problems.append(f"sampler.num_timesteps must be >= 1 (got {cfg.sampler.num_timesteps})")
    if device_problem(cfg.device):
        problems.append(device_problem(cfg.device))
    if cfg.sampler.name != "rflow":
        problems.append(f"sampler.name={cfg.sampler.name!r} is not known; use rflow")
    problems += cache_problems(cfg.cache)
    if problems:
        raise UserError("invalid configuration: " + "; ".join(problems) + ".")


def cache_problems(c: CacheConfig) -> list[str]:
    """What is wrong with the cache settings (empty when nothing)."""
    out = []
    from runner.cache import POLICIES
    from runner.cache.deltadit import RULES

    if c.name not in POLICIES:
        out.append(f"cache.name={c.name!r} is not known; use one of {', '.join(POLICIES)} (named configs: cache=none, "
                   "adacache, adacache-slow, adacache-moreg, teacache, teacache-slow, fbcache, deltadit, "
                   "deltadit-port, pab246, pab357, pab579)")
    if c.speed not in ("fast", "slow"):
        out.append(f"cache.speed={c.speed!r} is not known; use fast or slow")
    if c.cache_res not in ("t-attn", "s-attn", "ca-mlp"):
        out.append(f"cache.cache_res={c.cache_res!r} is not known; use t-attn, s-attn or ca-mlp")
    from runner.cache.codebook import PUBLISHED

    if c.codebook_steps is not None and (c.codebook_steps, c.speed) not in PUBLISHED:
        known = ", ".join(f"{n} ({s})" for n, s in PUBLISHED)
        out.append(f"cache.codebook_steps={c.codebook_steps} has no published {c.speed} codebook; use null or one of {known}")
    if (c.codebook_thresholds is None) != (c.codebook_rates is None):
        out.append("a custom codebook needs both cache.codebook_thresholds and cache.codebook_rates")
    elif c.codebook_thresholds is not None:
        th, rates = list(c.codebook_thresholds), list(c.codebook_rates)
        if len(rates) != len(th) + 1 or any(b <= a for a, b in zip(th, th[1:])) or min(rates) < 1:
            out.append("cache.codebook_rates needs one more rate (each >= 1) than cache.codebook_thresholds "
                       "(strictly increasing)")
    if c.moreg_window is not None and (len(c.moreg_window) != 2 or not 1 <= c.moreg_window[0] <= c.moreg_window[1]):
        out.append(f"cache.moreg_window={list(c.moreg_window)} must be [first, last] 1-based steps with first <= last")
    if not c.moreg_strides or min(c.moreg_strides) < 1:
        out.append("cache.moreg_strides must be a non-empty list of frame strides >= 1")
    if c.cache_loc is not None and (not c.cache_loc or min(c.cache_loc) < 0):
        out.append("cache.cache_loc must be null or a non-empty list of layer indices >= 0")
    if c.teacache_thresh is not None and not c.teacache_thresh > 0:
        out.append(f"cache.teacache_thresh={c.teacache_thresh} must be > 0 (or null: 0.1 slow, 0.2 fast)")
    if not c.fbcache_threshold > 0:
        out.append(f"cache.fbcache_threshold={c.fbcache_threshold} must be > 0")
    if c.deltadit_rule not in RULES:
        out.append(f"cache.deltadit_rule={c.deltadit_rule!r} is not known; use {' or '.join(RULES)}")
    if (c.deltadit_interval is None) != (c.deltadit_span is None):
        out.append("set both cache.deltadit_interval (N) and cache.deltadit_span (N_c), or neither (then "
                   "cache.deltadit_speedup gives them)")
    elif c.deltadit_span is None and not c.deltadit_speedup > 1:
        out.append(f"cache.deltadit_speedup={c.deltadit_speedup} must be > 1")
    if len(c.pab_ranges) != 3 or min(c.pab_ranges, default=0) < 1:
        out.append(f"cache.pab_ranges={list(c.pab_ranges)} must be 3 ranges >= 1 (spatial, temporal, cross)")
    if len(c.pab_window) != 2 or not c.pab_window[0] < c.pab_window[1]:
        out.append(f"cache.pab_window={list(c.pab_window)} must be [low, high] timesteps with low < high")
    return out
