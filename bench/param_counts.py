"""Print the parameter counts of the published Open-Sora 1.2 VAE and T5-XXL encoder.

Both are built on the meta device from their published configurations: nothing is allocated
or downloaded. Run from the repository root: ``python bench/param_counts.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.param_count import opensora_vae_param_counts, t5_xxl_encoder_param_count  # noqa: E402


def _row(name: str, n: int) -> str:
    return f"{name:<31} {n:>14,d}  ({n / 1e6:8.2f} M; {4 * n / 1e9:5.2f} GB fp32, {2 * n / 1e9:5.2f} GB bf16)"


def main() -> None:
    vae = opensora_vae_param_counts()
    print(_row("VAE spatial (SDXL 2D VAE)", vae["spatial_vae"]))
    print(_row("VAE temporal (VAE_Temporal_SD)", vae["temporal_vae"]))
    print(_row("VAE total", vae["total"]))
    print(_row("T5-XXL encoder", t5_xxl_encoder_param_count()))


if __name__ == "__main__":
    main()
