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
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from parallel.mesh import ParallelConfig
from runner.cache import CONFIGS as CACHE_CONFIGS
from runner.sampler import SamplerSettings


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
class CheckpointConfig:
    """Step checkpoints of the sampling loop (runner/checkpoint.py): where a stopped or killed run
    resumes. A stop signal writes one whenever the cache policy supports it, whatever every_steps is."""

    # Also write one every this many steps (at the first step the policy computes from there on);
    # 0: only on a stop signal. The Slurm script sets 10.
    every_steps: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # One of the policies' typed configs (runner.cache.CONFIGS), chosen by cache=NAME (conf/cache/).
    cache: Any = MISSING
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
    # torch.compile the DiT's blocks (runner/assemble.py), the last step of the assembly.
    compile: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Reference-frame conditioning (runner/conditioning.py, Open-Sora 1.2's syntax): reference image(s)
    # or video(s), several separated by ';' (a prompts file may give them per prompt as
    # 'caption{"reference_path": "...", "mask_strategy": "..."}'); where they go, either as a
    # mask_strategy ('loop,ref,ref_start,target_start,length,edit_ratio;...', latent frames; quote
    # it: mask_strategy='0,0,0,0,1,0') or a shorthand condition=image|extend|connect.
    reference: Optional[str] = None
    mask_strategy: Optional[str] = None
    condition: Optional[str] = None
    # Latent frames carried over by condition=extend and by each loop; null: one VAE chunk (5 latent
    # frames for Open-Sora, 1 frame for the demo model).
    condition_frame_length: Optional[int] = None
    # Edit ratio of the frames each loop carries over (Open-Sora's condition_frame_edit): 0 keeps them
    # as they are; r in (0, 1] lets the sampler re-noise and regenerate them once t <= r * 1000.
    condition_frame_edit: float = 0.0
    # Generate the video N times longer: each loop continues the last condition_frame_length frames
    # of the one before; the loops are stitched without the repeated frames.
    loop: int = 1


FAMILIES = ("demo", "opensora-v1.2")


def cache_schema(cls) -> str:
    """The ConfigStore name of a policy's config in the `cache` group (conf/cache/*.yaml extend it)."""
    return f"{cls().name}_schema"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for cls in CACHE_CONFIGS:
        cs.store(group="cache", name=cache_schema(cls), node=cls)


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
    if cfg.checkpoint.every_steps < 0:
        problems.append(f"checkpoint.every_steps must be >= 0 (0: only on a stop signal), got {cfg.checkpoint.every_steps}")
    if cfg.loop < 1:
        problems.append(f"loop must be >= 1 (got {cfg.loop})")
    if cfg.condition_frame_length is not None and cfg.condition_frame_length < 1:
        problems.append(f"condition_frame_length must be >= 1 or null (got {cfg.condition_frame_length})")
    if not 0.0 <= cfg.condition_frame_edit <= 1.0:
        problems.append(f"condition_frame_edit must be in [0, 1] (got {cfg.condition_frame_edit})")
    if device_problem(cfg.device):
        problems.append(device_problem(cfg.device))
    if cfg.sampler.name != "rflow":
        problems.append(f"sampler.name={cfg.sampler.name!r} is not known; use rflow")
    if cfg.cache.name != type(cfg.cache)().name:  # the name labels the policy; it does not choose one
        named = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "cache")) if f.endswith(".yaml"))
        problems.append(f"cache.name={cfg.cache.name!r} does not choose a policy (this config is "
                        f"{type(cfg.cache).__name__}); choose one with cache=NAME: {', '.join(named)}")
    problems += cfg.cache.problems()
    if problems:
        raise UserError("invalid configuration: " + "; ".join(problems) + ".")
