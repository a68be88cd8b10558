"""Model families: what turns prompts into conditioning and latents into frames around STDiT3.

    base      Conditioning, PipelineBase: what every family shares
    demo      DemoPipeline: pixel space, the small built-in text encoder (runs on a CPU in seconds)
    opensora  OpenSoraPipeline: T5-XXL -> STDiT3-XL/2 -> Open-Sora VAE 1.2, from local files

`build_pipeline` picks one by `model.family`; nothing else here knows which families exist.
"""

from __future__ import annotations

import os

import torch

from runner.config import ModelConfig, UserError
from runner.families.demo import DEMO_ARCH, _load_demo_dir, _named_arch, random_demo
from runner.families.opensora import build_opensora_pipeline

# The trained demo model shipped with the repository (`model.weights=builtin:demo`).
BUILTIN = {"demo": os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "assets", "demo")}


def resolve_weights(path: str) -> str:
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN:
            raise UserError(f"model.weights={path} is not a built-in model; known: builtin:{', builtin:'.join(BUILTIN)}.")
        return BUILTIN[name]
    return path


def build_pipeline(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """-> DemoPipeline or OpenSoraPipeline (same interface), by cfg.family."""
    if cfg.family == "opensora-v1.2":
        return build_opensora_pipeline(cfg, device, dtype)
    if cfg.family != "demo":
        raise UserError(f"model.family={cfg.family!r} is not known; use model=demo or model=opensora-v1.2.")
    if cfg.weights is None:
        arch = DEMO_ARCH if cfg.arch == "STDiT3-demo" else _named_arch(cfg.arch)
        return random_demo(arch, cfg.init_seed, device, dtype)
    return _load_demo_dir(resolve_weights(cfg.weights), device, dtype)
