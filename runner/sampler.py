"""Rectified-flow sampling as in Open-Sora 1.2. The sampler owns the loop: timesteps, the
resolution/length-dependent timestep transform, classifier-free guidance, the Euler update and the
step index that it hands to whoever watches the loop (cache policies, collective counters, timers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def timestep_transform(
    t: float,
    height: float,
    width: float,
    num_frames: int,
    num_timesteps: int = 1000,
    base_resolution: float = 512 * 512,
    scale: float = 1.0,
    cond_dtype: torch.dtype = torch.bfloat16,
) -> float:
    """Shift timesteps towards noise for bigger and longer videos (Open-Sora's `timestep_transform`).

    Open-Sora builds height, width and num_frames as bf16 tensors, so the ratio is computed in bf16:
    `cond_dtype` reproduces that (854 wide becomes 856, sqrt(30) becomes 5.46875); pass
    torch.float64 for exact arithmetic.
    """
    h = torch.tensor(height, dtype=cond_dtype)
    w = torch.tensor(width, dtype=cond_dtype)
    frames = torch.tensor(num_frames, dtype=cond_dtype)
    ratio_space = (h * w / base_resolution).sqrt()
    # Latent frames per 17-frame chunk of the VAE: 5. Images count as one frame.
    frames = torch.ones_like(frames) if num_frames == 1 else frames // 17 * 5
    ratio = (ratio_space * frames.sqrt() * scale).double().item()
    return shift_timestep(t, ratio, num_timesteps)


def transform_ratio(height, width, num_frames, cond_dtype=torch.bfloat16) -> float:
    """The ratio of `timestep_transform` (tau' = r*tau / (1 + (r-1)*tau))."""
    t = 500.0  # solve r from one transformed point: tau' = r*tau/(1+(r-1)tau) with tau = 1/2
    tp = timestep_transform(t, height, width, num_frames, cond_dtype=cond_dtype) / 1000
    return tp / (1 - tp)


@dataclass
class SamplerSettings:
    """The sampler's settings (`sampler.*` of the job's config)."""

    name: str = "rflow"  # the only sampler: Open-Sora 1.2's rectified flow
    num_steps: int = 30
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = 1000
    # A fixed ratio r instead of the one computed from the video size (the demo model, trained with
    # it, works in pixel space where Open-Sora's latent-geometry ratio does not apply).
    timestep_shift: float | None = None


def shift_timestep(t: float, ratio: float, num_timesteps: int = 1000) -> float:
    """tau' = r tau / (1 + (r - 1) tau), tau = t / num_timesteps (the transform with a fixed r); t may
    be a float or a tensor."""
    tau = t / num_timesteps
    return num_timesteps * ratio * tau / (1 + (ratio - 1) * tau)


def make_timesteps(s: SamplerSettings, height: float, width: float, num_frames: int) -> list[float]:
    """The num_steps timesteps from num_timesteps down, transformed (host floats, no device sync)."""
    if s.num_steps < 1:
        raise ValueError(f"sampler.num_steps must be >= 1, got {s.num_steps}")
    ts = [(1.0 - i / s.num_steps) * s.num_timesteps for i in range(s.num_steps)]
    if s.timestep_shift is not None:
        if s.timestep_shift <= 0:
            raise ValueError(f"sampler.timestep_shift must be > 0, got {s.timestep_shift}")
        ts = [shift_timestep(t, s.timestep_shift, s.num_timesteps) for t in ts]
    elif s.use_timestep_transform:
        ts = [timestep_transform(t, height, width, num_frames, s.num_timesteps) for t in ts]
    return ts


@dataclass
class StepInfo:
    """What a model call is told about its place in the loop."""

    index: int
    num_steps: int
    timestep: float


ModelFn = Callable[..., torch.Tensor]  # (z_in, t_in, info[, x_mask=]) -> model output


@dataclass
class GivenFrames:
    """Reference frames kept clean through the loop (runner/conditioning.py): the per-step frame
    schedule (`edit_schedule`: x_mask and the frames re-noised at that step) and `noise(i)`, this
    rank's band of the full-size noise drawn for step i. The caller has already written the given
    frames into the latent (`place`)."""

    steps: list  # runner.conditioning.FrameStep per sampling step
    noise: Callable[[int], torch.Tensor]


def renoise(x0: torch.Tensor, eps: torch.Tensor, t: float, num_timesteps: int) -> torch.Tensor:
    """x0 noised to level t as Open-Sora's RFlowScheduler.add_noise, in its float32 arithmetic."""
    tau = 1 - torch.tensor(t, dtype=torch.float32) / num_timesteps
    return tau * x0 + (1 - tau) * eps


def guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def sample(
    model_fn: ModelFn,
    z: torch.Tensor,
    settings: SamplerSettings,
    timesteps: list[float],
    latent_channels: int,
    on_step: Callable[[int, str], None] | None = None,
    cfg_combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    start: int = 0,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
    given: GivenFrames | None = None,
) -> torch.Tensor:
    """Integrate z (B, C, T, H, W) from noise to data with Euler steps.

    `model_fn(z_in, t_in, info)` returns the model output for the CFG batch [cond; uncond]
    (2B samples) built here; only its first `latent_channels` channels (the velocity) are used.
    `cfg_combine`, if given, replaces the default split-and-combine of that output (a CFG-parallel
    layout, where each rank computes one half, supplies its own). `on_step(i, "start"|"end")` is
    called around every step. `start`: the first step to run, z being the latent before it (a
    resumed run). `before_step(i, z)`, at every step boundary before `on_step(i, "start")`, sees the
    latent before step i (step checkpoints, runner/checkpoint.py); it may raise to end the loop.

    `given` (conditioning): at every step, as Open-Sora 1.2's RFLOW.sample, x0 = z; a noise tensor is
    drawn (every step, used or not, so the random stream is the reference's); frames whose edit
    ratio is reached at this step are re-noised from x0 to level t; the model gets the step's
    x_mask (False = given: timestep 0's modulation); after the Euler update the frames not yet
    generated are set back to x0, so given frames stay exactly the reference's latent.
    """
    n = len(timesteps)
    if not 0 <= start < n:
        raise ValueError(f"start={start} is outside the {n} steps")
    for i in range(start, n):
        t = timesteps[i]
        if before_step:
            before_step(i, z)
        if on_step:
            on_step(i, "start")
        info = StepInfo(i, n, t)
        extra = {}
        if given is not None:
            frame = given.steps[i]
            x0 = z.clone()
            eps = given.noise(i)
            keep = frame.x_mask.to(z.device)[None, None, :, None, None]
            if frame.renoise.any():
                z = torch.where(frame.renoise.to(z.device)[None, None, :, None, None],
                                renoise(x0, eps, t, settings.num_timesteps).to(z.dtype), x0)
            # One row (T,) for the whole batch: the model repeats it to [cond; uncond] or one CFG half.
            extra["x_mask"] = frame.x_mask[None]
        if cfg_combine is None:
            z_in = torch.cat([z, z], 0)
            t_in = torch.full((z_in.shape[0],), t, device=z.device, dtype=torch.float32)
            out = model_fn(z_in, t_in, info, **extra)[:, :latent_channels]
            v_cond, v_uncond = out.chunk(2, dim=0)
            v = guidance(v_cond, v_uncond, settings.cfg_scale)
        else:
            t_in = torch.full((z.shape[0],), t, device=z.device, dtype=torch.float32)
            v = cfg_combine(model_fn(z, t_in, info, **extra)[:, :latent_channels])
        t_next = timesteps[i + 1] if i + 1 < n else 0.0
        dt = (t - t_next) / settings.num_timesteps
        z = z.float() + v * dt
        if given is not None:
            z = torch.where(keep, z, x0.float())
        if i == start:  # one host sync: a broken run (NaN weights, fp16 overflow) stops now, not after every step
            check_finite(z, f"after step {i + 1} of {n}")
        if on_step:
            on_step(i, "end")
    return z


def check_finite(z: torch.Tensor, when: str = "after the last step") -> None:
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"the latent has NaN or Inf values {when}")


__all__ = [
    "GivenFrames",
    "SamplerSettings",
    "StepInfo",
    "guidance",
    "make_timesteps",
    "sample",
    "shift_timestep",
    "timestep_transform",
    "transform_ratio",
    "check_finite",
]
