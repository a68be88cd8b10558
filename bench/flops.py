"""FLOPs of STDiT3-XL/2 for the published settings (one forward of the CFG pair, and 30 steps).

    python bench/flops.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.flops import stdit3_flops  # noqa: E402
from models.stdit3 import get_config  # noqa: E402

# (name, latent frames, latent height, latent width): Open-Sora VAE 4x8x8, 9:16 = landscape.
SETTINGS = [("480p 2s (51 frames)", 15, 60, 106), ("720p 4s (102 frames)", 30, 90, 160)]


def main():
    cfg = get_config("STDiT3-XL/2")
    print(f"{'setting':<22}{'text':>6}{'TFLOP/forward':>15}{'TFLOP/30 steps':>16}  attention share")
    for name, t, h, w in SETTINGS:
        for text in (300, 30):
            f = stdit3_flops(cfg, batch=2, frames=t, height=h, width=w, text_len=text)
            attn = (f.spatial_attn + f.temporal_attn + f.cross_attn) / f.total
            print(f"{name:<22}{text:>6}{f.total / 1e12:>15.1f}{30 * f.total / 1e12:>16.0f}  {attn:.1%}")
    print("published: about 3230 TFLOPs for 30 steps of 480p 2s with CFG")


if __name__ == "__main__":
    main()
