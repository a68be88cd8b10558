"""Video files: uint8 (T, H, W, 3) frames <-> mp4 (H.264 through imageio-ffmpeg)."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounding as Open-Sora saves samples."""
    x = x.detach().float().clamp(-1, 1).add(1).div(2).mul(255).add(0.5).clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str, frames: np.ndarray, fps: int = 24, crf: int = 12) -> None:
    """Write frames to `path` as it is given. Atomic writing (a temporary name unique to the process,
    then a rename) is runner.outputs.OutputDir's job, which hands this its temporary path."""
    # 4:2:0 chroma needs even sizes; odd sizes are kept exact with 4:4:4.
    even = frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
    # macro_block_size=1 keeps the exact size (no silent resize to a multiple of 16).
    with imageio.get_writer(
        path, fps=fps, codec="libx264", quality=None, macro_block_size=1,
        ffmpeg_params=["-crf", str(crf)], pixelformat="yuv420p" if even else "yuv444p", ffmpeg_log_level="error",
    ) as w:
        for frame in frames:
            w.append_data(frame)


def read_video(path: str) -> np.ndarray:
    """-> (T, H, W, 3) uint8."""
    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([f for f in r])
