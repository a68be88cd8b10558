"""Parameter counts of the published Open-Sora 1.2 VAE and T5-XXL encoder, built on the meta
device (no memory allocated, nothing downloaded)."""

from __future__ import annotations

import torch
import torch.nn as nn


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in module.parameters())


def opensora_vae_param_counts() -> dict[str, int]:
    from models.vae import OpenSoraVAE

    with torch.device("meta"):
        vae = OpenSoraVAE()
    spatial = count_parameters(vae.spatial_vae)
    temporal = count_parameters(vae.temporal_vae)
    return {
        "spatial_vae": spatial,
        "temporal_vae": temporal,
        "total": spatial + temporal,
        "buffers": sum(b.numel() for b in vae.buffers()),
    }


def t5_xxl_encoder_param_count() -> int:
    from models.t5 import build_t5_encoder

    return count_parameters(build_t5_encoder(device="meta"))
