"""Does a generated demo video follow its caption? Plus PSNR and SSIM between two videos.

`judge` finds the caption's colour in every frame, fits a straight line to the centroid track and
names the motion; it also names the shape, chiefly from how much of its bounding box the colour
fills (circle ~0.785, square ~1, triangle ~0.5). The motion decision rejects tracks that a line
does not explain, so a video whose frames are shuffled in time is not credited with a direction.

Videos are uint8 (T, H, W, 3) arrays or tensors; float videos are taken to be in [-1, 1] (the
model's range), channel-first (3, T, H, W) or channel-last.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from runner.demo.data import DIRECTIONS, MARGIN, PALETTE, parse_caption

# A pixel belongs to a colour when that colour is its nearest palette entry and it lies within
# this RGB distance. Palette colours are >= 125 apart and >= 115 from any background, so 70
# tolerates generation noise yet rejects every background and edge pixels less than ~half covered.
COLOUR_TOLERANCE = 70.0
# Keep a mask pixel only when at least this many of its 8 neighbours are in the mask too: drops
# isolated specks and thin streaks but keeps the corners of real shapes (3 neighbours).
MIN_NEIGHBOURS = 2
# A colour is present in a frame when it covers at least this fraction of the frame (the
# smallest generated shape covers ~3.4%), and present in the video when in this share of frames.
MIN_AREA_FRACTION = 0.01
MIN_PRESENT_FRAMES = 0.75
# Motion thresholds, in frame fractions travelled over the whole clip (generated: 0.40 to 0.50,
# or 0.30 to 0.35 with runner.demo.data's edge starts).
STILL_MAX = 0.10  # both axes below: still
MOVE_MIN = 0.20  # dominant axis at least this to count as moving
CROSS_MAX = 0.5  # cross-axis displacement at most this share of the dominant one
# Line fit quality: RMS residual of the track (frame fractions) at most this share of the fitted
# displacement for a moving shape (shuffled frames give ~0.3 x sqrt(1 - rho^2) / |rho|), and at most
# STILL_RESIDUAL_MAX for a still one.
RESIDUAL_RATIO_MAX = 0.15
STILL_RESIDUAL_MAX = 0.05
# Shape cues, per frame then median over frames, on the mask's bounding box:
#   fill    share of the box covered           triangle 1/2, circle pi/4, square 1
#   corner  share of the box's corner regions  triangle 1/3, circle 0,    square 1
#           (|u| + |v| > 1.4 in box coordinates u, v in [-1, 1])
#   drop    (centroid y - box centre y) / box height: triangle 1/6 (apex up), others 0
# Fill alone confuses small circles and squares at 32 px (a circle of radius 4 px can fill 0.89 of
# its box), the corner and drop cues separate them. Nearest prototype, each cue divided by
# roughly the gap between its prototypes.
SHAPE_PROTOTYPES = {
    "triangle": (0.5, 1 / 3, 1 / 6),
    "circle": (math.pi / 4, 0.0, 0.0),
    "square": (1.0, 1.0, 0.0),
}
SHAPE_CUE_SCALE = (0.25, 0.5, 0.15)

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)


def as_uint8_video(video) -> np.ndarray:
    """Any supported video -> uint8 numpy (T, H, W, 3)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype == torch.bfloat16:
            video = video.float()
        video = video.numpy()
    v = np.asarray(video)
    if v.ndim != 4:
        raise ValueError(f"expected a 4-d video, got shape {v.shape}")
    if v.shape[-1] != 3 and v.shape[0] == 3:
        v = np.moveaxis(v, 0, -1)  # (3, T, H, W) -> (T, H, W, 3)
    if v.shape[-1] != 3:
        raise ValueError(f"expected 3 channels first or last, got shape {v.shape}")
    if v.dtype == np.uint8:
        return v
    if not np.issubdtype(v.dtype, np.floating):
        raise ValueError(f"expected uint8 or float video, got {v.dtype}")
    return np.clip(np.rint((v.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """Per pixel, how many of its 8 neighbours are set; mask is (T, H, W) bool."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    h, w = mask.shape[1:]
    total = sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
    return total - mask


def colour_mask(video, colour: str, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """(T, H, W) bool: pixels of the named palette colour, with stray specks removed."""
    if colour not in PALETTE:
        raise ValueError(f"unknown colour {colour!r}")
    v = as_uint8_video(video).astype(np.float32)
    # Squared distances to every palette colour, |v|^2 - 2 v.c + |c|^2, as one matmul.
    d2 = (v * v).sum(-1, keepdims=True) - 2 * v @ _PALETTE_RGB.T + (_PALETTE_RGB ** 2).sum(-1)
    k = _PALETTE_NAMES.index(colour)
    # Nearest-colour rule: a tolerance wider than half the palette spacing stays unambiguous.
    mask = (d2.argmin(-1) == k) & (d2[..., k] < tolerance ** 2)
    return mask & (_neighbour_count(mask) >= MIN_NEIGHBOURS)


def _fit_line(t: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares slopes of x and y against t in [0, 1], and the RMS residual (2-d)."""
    a = np.stack([t, np.ones_like(t)], axis=1)
    coef, *_ = np.linalg.lstsq(a, xy, rcond=None)
    resid = xy - a @ coef
    return coef[0], float(np.sqrt((resid ** 2).sum(1).mean()))


def classify_motion(track: np.ndarray, present: np.ndarray) -> dict:
    """Name the motion of a centroid track (T, 2) in frame fractions, using present frames only.

    Returns motion_pred in left/right/up/down/still, or "unclear" when the track is too short,
    diagonal, too slow to be moving but too fast to be still, or not explained by a line.
    """
    num_frames = len(track)
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    out = {"motion_pred": "unclear", "displacement": (0.0, 0.0), "residual": float("nan")}
    if present.sum() < max(3, num_frames // 2):
        return out
    slope, residual = _fit_line(t[present], track[present])
    sx, sy = float(slope[0]), float(slope[1])
    out.update(displacement=(sx, sy), residual=residual)
    dom = max(abs(sx), abs(sy))
    if dom < STILL_MAX:
        if residual <= STILL_RESIDUAL_MAX:
            out["motion_pred"] = "still"
    elif (dom >= MOVE_MIN and min(abs(sx), abs(sy)) <= CROSS_MAX * dom
          and residual <= RESIDUAL_RATIO_MAX * dom):
        if abs(sx) >= abs(sy):
            out["motion_pred"] = "right" if sx > 0 else "left"
        else:
            out["motion_pred"] = "down" if sy > 0 else "up"
    return out


def _centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a (T, H, W) mask: its centroid (x, y) in frame fractions, and whether it covers
    enough of the frame to count as present."""
    h, w = mask.shape[1:]
    area = mask.sum((1, 2))
    safe = np.maximum(area, 1)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    centres = np.stack([(mask.sum(1) * xs).sum(1) / safe / w, (mask.sum(2) * ys).sum(1) / safe / h], axis=1)
    return centres, area >= max(4, MIN_AREA_FRACTION * h * w)

def shape_features(mask: np.ndarray, present: np.ndarray) -> tuple[float, float, float]:
    """Median (fill, corner, drop) over the present frames of a (T, H, W) mask; see above."""
    cues = []
    for m in mask[present]:
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        h, w = y1 - y0 + 1, x1 - x0 + 1
        v = (np.arange(h) + 0.5) / h * 2 - 1
        u = (np.arange(w) + 0.5) / w * 2 - 1
        corner = np.abs(v)[:, None] + np.abs(u)[None, :] > 1.4
        box = m[y0:y1 + 1, x0:x1 + 1]
        cues.append((
            len(ys) / (h * w),
            float(box[corner].mean()) if corner.any() else 0.0,
            (ys.mean() - (y0 + y1) / 2) / h,
        ))
    fill, corner_fill, drop = np.median(np.array(cues), axis=0)
    return float(fill), float(corner_fill), float(drop)


def classify_shape(features: tuple[float, float, float]) -> str:
    """Nearest shape prototype in scaled (fill, corner, drop) space."""
    f = np.asarray(features)
    scale = np.asarray(SHAPE_CUE_SCALE)
    dist = {k: float(np.linalg.norm((f - np.asarray(p)) / scale))
            for k, p in SHAPE_PROTOTYPES.items()}
    return min(dist, key=dist.get)


def judge(video, caption: str) -> dict:
    """Check one video against its caption.

    Returns colour_ok (the colour is present in enough frames), motion_pred / motion_ok, shape_pred
    (None when the colour is absent) / shape_ok (None when the caption names no shape), ok =
    colour_ok and motion_ok, and diagnostics (present_fraction, displacement, residual, shape_cues).
    """
    want = parse_caption(caption)
    if want["colour"] is None or want["motion"] is None:
        raise ValueError(f"caption names no colour or no motion: {caption!r}")
    v = as_uint8_video(video)
    mask = colour_mask(v, want["colour"])
    centres, present = _centroids(mask)
    present_fraction = float(present.mean())
    colour_ok = present_fraction >= MIN_PRESENT_FRAMES
    motion = classify_motion(centres, present)
    motion_ok = colour_ok and motion["motion_pred"] == want["motion"]

    shape_pred = shape_ok = None
    cues = (float("nan"),) * 3
    if colour_ok:
        cues = shape_features(mask, present)
        shape_pred = classify_shape(cues)
        if want["shape"] is not None:
            shape_ok = shape_pred == want["shape"]
    elif want["shape"] is not None:
        shape_ok = False
    return {
        "caption": caption,
        "colour_ok": bool(colour_ok),
        "motion_pred": motion["motion_pred"],
        "motion_ok": bool(motion_ok),
        "shape_pred": shape_pred,
        "shape_ok": shape_ok,
        "ok": bool(colour_ok and motion_ok),
        "present_fraction": present_fraction,
        "displacement": motion["displacement"],
        "residual": motion["residual"],
        "shape_cues": cues,
    }


def score(videos: Sequence, captions: Sequence[str]) -> dict:
    """Judge each (video, caption) pair. accuracy_colour: the captioned colour is present;
    accuracy_colour_motion: present and moving as captioned; accuracy_shape counts only captions
    that name a shape."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    items = [judge(v, c) for v, c in zip(videos, captions)]
    shaped = [it["shape_ok"] for it in items if it["shape_ok"] is not None]
    nan = float("nan")
    return {
        "accuracy_colour": float(np.mean([it["colour_ok"] for it in items])) if items else nan,
        "accuracy_colour_motion": float(np.mean([it["ok"] for it in items])) if items else nan,
        "accuracy_shape": float(np.mean(shaped)) if shaped else nan,
        "per_item": items,
    }



# --- continuation ------------------------------------------------------------------------------

# Mean distance (frame fractions) of the generated frames' centroids from the source clip's. With one
# given frame the speed is not known (travel 0.40-0.50 per clip: up to 0.1 apart at the last frame,
# 0.05 on average); a track turned round, restarted or left behind is off by 0.15 or more.
POSITION_TOLERANCE = 0.1


SEAM_SLACK = 0.05  # frame fractions a seam's step may exceed the largest step inside the loops
# After a seam a moving track must keep between these multiples of loop 0's speed along the
# captioned direction (a frozen, crawling or turned-back loop fails, and so does one that rushes on),
# until the shape reaches the frame's border on the side it heads to, where the check stops: the
# training data's speeds differ by 17% at most, and no edge-start clip goes past the border.
SEAM_SPEED_MIN = 0.5
SEAM_SPEED_MAX = 2.0


def track(video, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2) centroids (x, y) of a colour in frame fractions, and (T,) whether it is present."""
    return _centroids(colour_mask(video, colour))


def continuation(video, source, caption: str, given: int) -> dict:
    """Does `video` continue `source`, the clip whose first `given` frames it was given?

    colour_ok: the caption's colour is in at least MIN_PRESENT_FRAMES of the generated frames;
    motion_ok: `judge` reads the caption's motion over the whole video, given frames included (one
    straight track: it neither turns, stops nor jumps where the given frames end); position_ok: the
    generated frames' centroids lie within POSITION_TOLERANCE of the source's on average (it starts
    from where the given frames left it and keeps their speed). ok: all three.
    """
    v, src = as_uint8_video(video), as_uint8_video(source)
    if v.shape != src.shape:
        raise ValueError(f"video {v.shape} and source {src.shape} differ in shape")
    if not 1 <= given < v.shape[0]:
        raise ValueError(f"given must be between 1 and {v.shape[0] - 1}, got {given}")
    colour = parse_caption(caption)["colour"]
    centres, present = track(v, colour)
    truth, truth_present = track(src, colour)
    gen_present = present[given:]
    colour_ok = bool(gen_present.mean() >= MIN_PRESENT_FRAMES)
    both = gen_present & truth_present[given:]
    error = (float(np.linalg.norm(centres[given:][both] - truth[given:][both], axis=1).mean())
             if both.any() else float("inf"))
    whole = judge(v, caption)
    motion_ok = colour_ok and whole["motion_pred"] == parse_caption(caption)["motion"]
    position_ok = colour_ok and error <= POSITION_TOLERANCE
    return {"caption": caption, "given": given, "colour_ok": colour_ok, "motion_pred": whole["motion_pred"],
            "motion_ok": bool(motion_ok), "position_error": error, "position_ok": bool(position_ok),
            "ok": bool(colour_ok and motion_ok and position_ok)}


def _leading_room(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Per frame of a (T, H, W) mask: pixels between the shape's leading side and the border it
    heads to (0: touching it; the frame's size where the shape is absent)."""
    h, w = mask.shape[1:]
    cols, rows = mask.any(1), mask.any(2)  # (T, W), (T, H)
    def room(hits, n, d):
        idx = np.arange(n)
        if d > 0:
            return np.where(hits.any(1), n - 1 - np.where(hits, idx, -1).max(1), n)
        return np.where(hits.any(1), np.where(hits, idx, n).min(1), n)
    return room(cols, w, dx) if dx else room(rows, h, dy)


def seams(video, caption: str, loop_frames: int, cut: int) -> dict:
    """Loops stitched into one video (each `loop_frames` long, the later ones without their first `cut`
    frames): does the track continue across every seam?

    ok when the colour is present in at least MIN_PRESENT_FRAMES of all frames; no seam moves the
    centroid further than the largest step inside the loops plus SEAM_SLACK; and, for a moving
    caption, loop 0 reads as the captioned motion and after every seam the shape keeps moving that
    way at SEAM_SPEED_MIN to SEAM_SPEED_MAX times loop 0's speed, up to the frame where it reaches
    the border (it may stop or leave there). Per loop, the motion `judge` reads (loop 0 = frames
    0..loop_frames-1) is reported too.
    """
    v = as_uint8_video(video)
    want = parse_caption(caption)
    mask = colour_mask(v, want["colour"])
    centres, present = _centroids(mask)
    step = loop_frames - cut
    starts = [0] + [loop_frames + i * step for i in range((v.shape[0] - loop_frames) // step)]
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    ok_steps = present[1:] & present[:-1]
    seam_at = set(starts[1:])  # frame index where a later loop's new frames begin
    inner = [s for i, s in enumerate(steps) if ok_steps[i] and (i + 1) not in seam_at]
    jumps = [float(steps[s - 1]) if present[s] and present[s - 1] else float("inf") for s in starts[1:]]
    limit = (max(inner) if inner else 0.0) + SEAM_SLACK
    loops = []
    for s in starts:
        lo = max(0, s - cut)
        loops.append(judge(v[lo:lo + loop_frames], caption)["motion_pred"])
    colour_ok = bool(present.mean() >= MIN_PRESENT_FRAMES)
    speeds = [float("nan")] * (len(starts) - 1)  # per seam: speed after it / loop 0's, up to the border
    moving_ok = True
    dx, dy = DIRECTIONS[want["motion"]] if want["motion"] else (0, 0)
    if dx or dy:
        along = centres @ np.array([dx, dy], dtype=float)  # position in the captioned direction
        room = _leading_room(mask, dx, dy)
        # at the border: as close as the data's shapes come to it (MARGIN; their edge pixels are
        # partly covered and may miss the colour mask)
        border = max(1, round(MARGIN * (v.shape[2] if dx else v.shape[1])))
        first = loops[0] == want["motion"] and present[0] and present[loop_frames - 1]
        v0 = (along[loop_frames - 1] - along[0]) / (loop_frames - 1) if first else 0.0
        moving_ok = bool(first and v0 > 0)
        for k, s in enumerate(starts[1:]):
            a = s - 1  # the last frame before the seam
            if not present[a]:  # lost before the seam: no track to continue (speed left nan)
                moving_ok = False
                continue
            if room[a] <= border:  # at the border already: nothing left to continue into (nan)
                continue
            end = min(s + step, v.shape[0]) - 1
            b = next((t for t in range(s, end + 1) if not present[t] or room[t] <= border), end)
            if not present[b]:  # lost before it reached the border
                speeds[k], moving_ok = 0.0, False
                continue
            speeds[k] = float((along[b] - along[a]) / (b - a) / v0) if v0 > 0 else 0.0
            moving_ok &= SEAM_SPEED_MIN <= speeds[k] <= SEAM_SPEED_MAX
    return {"caption": caption, "frames": int(v.shape[0]), "seam_jumps": jumps, "inner_step_max": limit - SEAM_SLACK,
            "seam_speeds": speeds, "loop_motions": loops, "colour_ok": colour_ok, "moving_ok": moving_ok,
            "ok": bool(colour_ok and moving_ok and all(j <= limit for j in jumps))}


# --- fidelity metrics --------------------------------------------------------------------------


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_uint8_video(a), as_uint8_video(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b) -> float:
    """PSNR in dB over the whole video (one MSE over all frames); inf when identical."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004) over frames and RGB channels, data range 255.

    Gaussian window 11 / sigma 1.5 applied separably with 'valid' borders, population statistics;
    per channel, then averaged over channels and frames. This equals skimage's
    structural_similarity(..., channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255) per frame.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < window:
        raise ValueError(f"frames {a.shape[1:3]} are smaller than the {window}-pixel window")
    # (T, H, W, 3) -> (T*3, 1, H, W): every channel of every frame is an independent image.
    x = torch.from_numpy(a).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3]).double()
    y = torch.from_numpy(b).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3]).double()
    g = _gaussian_window(window, sigma)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_frame = s.reshape(a.shape[0], 3, -1).mean(-1).mean(-1)
    return float(per_frame.mean())
