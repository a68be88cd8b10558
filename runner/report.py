"""The JSON run report written next to each video."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
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
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def end(self, name: str) -> dict:
        """Close phase `name` (its record) and start the next one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # cpu_s: this process's CPU time (all threads); cpu_s / seconds is the cores it really had,
        # which is what a scaling study on shared or oversubscribed cores needs to know.
        rec = {"seconds": round(time.perf_counter() - self.t0, 6), "cpu_s": round(time.process_time() - self.cpu0, 6),
               "host_peak_rss_mb": round(_host_peak_mb(), 1)}
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, mesh=None) -> dict:
    """The hardware and software a run's figures depend on (for scaling tables)."""
    from runner.launch import available_cores

    cores = available_cores()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "hostname": platform.node(), "cpu_cores": cores, "threads_per_rank": torch.get_num_threads(),
           "device_type": device.type}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["device_count"] = torch.cuda.device_count()
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    else:
        env["device_name"] = _cpu_name()
    if mesh is not None:
        env["world_size"] = mesh.world_size
        env["backend"] = mesh.describe().get("backend")
        # torchrun sets LOCAL_WORLD_SIZE (processes on this node); the node count follows from it
        local = int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size) or 1)
        env["ranks_per_node"] = local
        env["nodes"] = int(os.environ.get("SLURM_NNODES", 0)) or max(1, -(-mesh.world_size // local))
    return env


def step_summary(step_times: list[float], pattern: str | None) -> dict:
    """Per-step wall times split into computed and reused steps (pattern: 'C'/'R' per step, from the
    cache policy's report; None or a length mismatch: every step counts as computed)."""
    if not pattern or len(pattern) != len(step_times):
        pattern = "C" * len(step_times)
    out = {}
    for kind, mark in (("computed", "C"), ("reused", "R")):
        ts = [t for t, m in zip(step_times, pattern) if m == mark]
        out[kind] = {"count": len(ts), "total_s": round(sum(ts), 6),
                     "median_s": round(statistics.median(ts), 6) if ts else None}
    return out


def build(cfg, pipe, device, dtype, *, prompt, seed, output, frames, step_times, timings, memory=None,
          index=None, mesh=None) -> dict:
    return {
        "output": os.path.abspath(output),
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "frames": {"count": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]), "fps": cfg.fps},
        "model": pipe.describe(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "code_version": code_version(),
        "host": environment(device, mesh),
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
