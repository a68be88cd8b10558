"""Open-Sora 1.2 resolution / aspect-ratio / duration presets (``opensora/datasets/aspect.py``).

Aspect ratios are written **H:W** and sizes are (height, width), so "9:16" is *landscape*:
720p 9:16 -> (720, 1280), 480p 9:16 -> (480, 854); "16:9" is portrait (1280, 720).

The model sees height, width, num_frames, aspect ratio and fps as bf16 tensors, so the values
it is conditioned on are bf16-rounded (``bf16_round``): width 854 becomes 856, which feeds the
position-embedding scale and the timestep transform.
"""

from __future__ import annotations

import math
import struct


# H:W ratio name -> table key
ASPECT_RATIOS = {
    "3:8": "0.38",
    "9:21": "0.43",
    "12:25": "0.48",
    "1:2": "0.50",
    "9:17": "0.53",
    "27:50": "0.54",
    "9:16": "0.56",
    "5:8": "0.62",
    "2:3": "0.67",
    "3:4": "0.75",
    "1:1": "1.00",
    "4:3": "1.33",
    "3:2": "1.50",
    "16:9": "1.78",
    "17:9": "1.89",
    "2:1": "2.00",
    "50:27": "2.08",
}

_KEYS = ("0.38", "0.43", "0.48", "0.50", "0.53", "0.54", "0.56", "0.62", "0.67", "0.75",
         "1.00", "1.33", "1.50", "1.78", "1.89", "2.00", "2.08")


def _table(*sizes):
    return dict(zip(_KEYS, sizes))


# resolution -> table key -> (height, width); values of aspect.py at Open-Sora v1.2.0
RESOLUTIONS = {
    "144p": _table((117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256),
                   (151, 241), (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144),
                   (263, 139), (271, 135), (277, 132)),
    "240p": _table((196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426),
                   (252, 404), (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240),
                   (440, 232), (452, 226), (462, 222)),
    "360p": _table((294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640),
                   (380, 608), (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360),
                   (660, 350), (678, 340), (692, 332)),
    "480p": _table((392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854),
                   (506, 810), (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480),
                   (880, 466), (906, 454), (924, 444)),
    "720p": _table((588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306), (720, 1280),
                   (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832), (1176, 784), (1280, 720),
                   (1320, 698), (1358, 680), (1386, 666)),
    "1080p": _table((882, 2352), (942, 2198), (998, 2080), (1018, 2036), (1048, 1980), (1058, 1958),
                    (1080, 1920), (1138, 1820), (1176, 1764), (1248, 1664), (1440, 1440), (1662, 1246),
                    (1764, 1176), (1920, 1080), (1980, 1048), (2036, 1018), (2078, 998)),
}

DURATIONS = {
    "1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816,
}


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a preset, e.g. ("720p", "9:16") -> (720, 1280)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(
            f"unknown aspect ratio {aspect_ratio!r} (written H:W, '9:16' is landscape); "
            f"valid: {', '.join(ASPECT_RATIOS)}"
        )
    return RESOLUTIONS[resolution][ASPECT_RATIOS[aspect_ratio]]


def num_frames(duration: str | int) -> int:
    """'2s' -> 51, '4s' -> 102, '8s' -> 204, '16s' -> 408 (also '1x'...'16x', '32s'), or an int."""
    if isinstance(duration, bool):
        raise ValueError(f"invalid duration {duration!r}")
    if isinstance(duration, int):
        n = duration
    elif isinstance(duration, str) and duration in DURATIONS:
        return DURATIONS[duration]
    elif isinstance(duration, str) and duration.strip().isdigit():
        n = int(duration.strip())
    else:
        raise ValueError(f"unknown duration {duration!r}; valid: {', '.join(DURATIONS)} or a frame count")
    if n < 1:
        raise ValueError(f"num_frames must be >= 1, got {n}")
    return n


def bf16_round(x: float) -> float:
    """``x`` rounded to bfloat16 (round to nearest, ties to even), as ``torch.tensor(x,
    dtype=torch.bfloat16).item()`` gives: 854 -> 856, 426 -> 426, 1280 -> 1280."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"bf16_round needs a finite value, got {x}")
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]

