"""The JSON run report written next to each video."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import torch
from omegaconf import OmegaConf


def code_version() -> str:
    """`git describe` of the source tree when available, else the package version."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("skipsync")
    except Exception:
        return "unknown"


def peak_memory(device: torch.device) -> dict:
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    mem = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        mem["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return mem


def build(cfg, pipe, device, dtype, *, prompt, seed, output, frames, step_times, timings) -> dict:
    return {
        "output": os.path.abspath(output),
        "prompt": prompt,
        "seed": seed,
        "frames": {"count": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]), "fps": cfg.fps},
        "model": pipe.describe(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "code_version": code_version(),
        "host": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()},
        "step_times_s": [round(t, 6) for t in step_times],
        "timings": {k: round(v, 6) for k, v in timings.items()},
        "memory": peak_memory(device),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    }


def write(path: str, rep: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
    os.replace(tmp, path)
