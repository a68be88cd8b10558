"""The JSON run report written next to each video."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from runner.outputs import plain_config


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


def _host_peak_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else the process peak (ru_maxrss, KiB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_host_peak() -> bool:
    # Linux resets VmHWM (and ru_maxrss) to the current RSS when "5" is written to clear_refs.
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Wall time and peak memory of consecutive phases (loading, text encoding, sampling, decoding).

    Peaks are reset at every phase boundary: GPU via torch.cuda.max_memory_allocated (what the
    tensors held, including whatever stayed resident from earlier phases, e.g. the weights), host
    via the peak RSS where Linux lets it be reset; elsewhere the host figure is the process peak
    so far (`host_peak_is_per_phase` says which). A phase's numbers are therefore its own peak,
    and the run's peak is the maximum over phases.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.records: dict[str, dict] = {}
        self.peak = {"host_peak_rss_mb": _host_peak_mb()}  # before the first reset: imports, setup
        self._start()

    def _start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.per_phase = _reset_host_peak()
        self.t0 = time.perf_counter()

    def end(self, name: str) -> dict:
        """Close phase `name` (its record) and start the next one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec = {"seconds": round(time.perf_counter() - self.t0, 6), "host_peak_rss_mb": round(_host_peak_mb(), 1)}
        if self.device.type == "cuda":
            rec["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        rec["host_peak_is_per_phase"] = self.per_phase
        self.records[name] = rec
        for k, v in rec.items():
            if k.endswith("_mb"):
                self.peak[k] = max(self.peak.get(k, 0.0), v)
        self._start()
        return rec

    def memory(self) -> dict:
        """The run's peaks so far plus the per-phase records."""
        return {**self.peak, "phases": dict(self.records)}


def build(cfg, pipe, device, dtype, *, prompt, seed, output, frames, step_times, timings, memory=None) -> dict:
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
        "memory": memory if memory is not None else peak_memory(device),
        "config": plain_config(cfg),
    }


def write(path: str, rep: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
    os.replace(tmp, path)
