"""Reference-frame conditioning (Open-Sora 1.2's image-to-video, extension, connect and loops):
the pure parts. Nothing here runs a model or a sampler; the entry point and the sampler call these.

Units. Everything *inside* a mask strategy, and ``condition_frame_length``, counts **latent frames**,
as Open-Sora 1.2 does (``apply_mask_strategy`` indexes the VAE-encoded reference and the latent
``z`` directly; its default ``condition_frame_length = 5`` is one VAE chunk, 17 video frames).
Every other frame count passed to this module (a reference's frames, the target's ``num_frames``)
counts **video frames**, turned into latent frames by the family's :class:`FrameMap`:
``DEMO_FRAMES`` (pixel-space latent: 1 video frame = 1 latent frame) or ``OPENSORA_FRAMES``
(VAE 1.2: independent chunks of 17 frames, 4x inside a chunk, so 17 -> 5, 51 -> 15, 1 -> 1).

Mask strategy syntax (Open-Sora's ``parse_mask_strategy``): entries separated by ``;``, each up to six
comma-separated numbers ``loop, reference, ref_start, target_start, length, edit_ratio``; missing
trailing fields default to ``0, 0, 0, 0, 1, 0`` ("0" = reference 0's first frame at the target's
first frame, fully given). Negative starts count from the end (``-1`` is the last latent frame of the
reference / of the target). An entry applies only in the loop with its loop id; later entries
overwrite earlier ones where they overlap. edit_ratio 0 keeps the given frames as they are, 1
regenerates them fully (starting from the reference latent, un-noised: the reference's quirk), r in
between re-noises them to noise level r and regenerates from there (see :func:`edit_schedule`).

Differences from the reference, on purpose: a range that does not fit (in the reference or in the
target) is an error here, where Open-Sora silently shortens it; a bad number, an unknown reference,
an unused loop id, an empty entry are one :class:`UserError` each, raised by :func:`check` before any
work. Open-Sora's ``align`` option (snapping starts to multiples, used only by its Gradio app) and
URL references (downloaded by Open-Sora) are not supported.

API, in the order the entry point uses it (one prompt; ``refs`` are that prompt's references)::

    text, paths, strategy = split_prompt_options(prompt)       # 'caption{"reference_path": ...}'
    texts = loop_prompts(text, loops)                          # '|0|a ...|2|b ...' -> one per loop
    strategy = strategy or condition_strategy("image" | "extend" | "connect", num_frames,
                                              condition_frame_length, len(paths), frame_map)
    entries = parse_mask_strategy(strategy)
    videos = [load_reference(p, height, width) for p in paths]     # (3, T, H, W) in [-1, 1]
    plan = loop_plan(loops, num_frames, condition_frame_length, frame_map, references=len(paths))
    entries = entries + list(plan.entries)                     # each loop continues the one before
    check(entries, [v.shape[1] for v in videos], num_frames, frame_map, loops)   # before any work
    latents = [vae.encode(v[None], sample=True)[0] for v in videos]
    for i in range(loops):
        z = noise                                              # drawn in full first, as the reference
        ratios = place(z, latents, entries, loop=i)            # z (B, C, T, H, W): given frames written
        steps = edit_schedule(ratios, timesteps)               # per step: x_mask and frames to re-noise
        ... sample, decode to video_i ...; latents.append(vae.encode(video_i, sample=True)[0])
    final = stitch(videos_of_each_loop, condition_frame_length, frame_map)

To match Open-Sora exactly: it samples both VAE posteriors when encoding a reference (the repo's
``encode`` returns the mean unless ``sample=True``), and it conditions loop i+1 on loop i's *decoded*
video encoded again (unclamped), not on loop i's latent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.vae import MICRO_FRAME_SIZE, latent_frames
from runner.config import UserError

# Open-Sora's MASK_DEFAULT: fields a short entry leaves out.
FIELDS = ("loop id", "reference id", "reference start", "target start", "length", "edit ratio")
DEFAULTS = (0, 0, 0, 0, 1, 0.0)
KINDS = ("image", "extend", "connect")
# Open-Sora 1.2's default for loops: one VAE chunk (5 latent = 17 video frames) carried over.
OPENSORA_CONDITION_FRAME_LENGTH = 5
# What Open-Sora's read_from_path accepts: its VID_EXTENSIONS; images are torchvision's IMG_EXTENSIONS.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---- frame mapping ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameMap:
    """Video frames -> latent frames of a family's autoencoder: the video is cut into independent
    chunks of ``chunk`` frames and each chunk of n frames gives ceil(n / factor) latent frames."""

    chunk: int = 1
    factor: int = 1

    @property
    def identity(self) -> bool:
        return self.chunk_latents == self.chunk

    @property
    def chunk_latents(self) -> int:
        return -(-self.chunk // self.factor)

    def latent(self, frames: int) -> int:
        """Latent frames of a video of `frames` frames (the VAE's own arithmetic)."""
        return latent_frames(frames, self.chunk, self.factor)

    def video(self, latents: int) -> int:
        """Video frames decoded from the first `latents` latent frames, which must be whole chunks
        (Open-Sora's ``dframe_to_frame``: n // 5 * 17, n a multiple of 5)."""
        if latents % self.chunk_latents:
            raise UserError(
                f"condition_frame_length={latents} is not a whole number of VAE chunks ({self.chunk_latents} "
                f"latent frames = {self.chunk} video frames each): a looped video is cut at its seams in whole "
                f"chunks, as Open-Sora does. Use a multiple of {self.chunk_latents}.")
        return latents // self.chunk_latents * self.chunk

    def describe(self, latents: int, frames: int | None = None) -> str:
        """'8 frames', or '15 latent frames (51 video frames)' where the two differ."""
        if self.identity:
            return f"{latents} frame{'s' * (latents != 1)}"
        text = f"{latents} latent frame{'s' * (latents != 1)}"
        return text + (f" ({frames} video frames)" if frames is not None else "")


DEMO_FRAMES = FrameMap()
OPENSORA_FRAMES = FrameMap(MICRO_FRAME_SIZE, 4)


# ---- mask strategies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskEntry:
    """One insertion: in loop `loop`, `length` latent frames of reference `reference` from
    `ref_start` go to the target from `target_start`, kept (edit_ratio 0) or partly regenerated."""

    loop: int = 0
    reference: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def __str__(self) -> str:  # Open-Sora's syntax; parse_mask_strategy(str(e)) == [e]
        r = repr(float(self.edit_ratio))
        r = r[:-2] if r.endswith(".0") else r
        return f"{self.loop},{self.reference},{self.ref_start},{self.target_start},{self.length},{r}"


def format_strategy(entries) -> str:
    return ";".join(str(e) for e in entries)


def _field_problem(e: MaskEntry) -> str | None:
    """What is wrong with an entry on its own (no reference or target needed), or None."""
    if e.loop < 0:
        return f"the loop id must be >= 0, got {e.loop}"
    if e.reference < 0:
        return f"the reference id must be >= 0, got {e.reference}"
    if e.length < 1:
        return f"the length must be at least 1 frame, got {e.length}"
    if not 0.0 <= e.edit_ratio <= 1.0:  # also refuses nan
        return f"the edit ratio must be in [0, 1] (0 keeps the frames, 1 regenerates them), got {e.edit_ratio}"
    return None


def parse_mask_strategy(text: str | None) -> list[MaskEntry]:
    """Open-Sora's mask-strategy string -> entries ('' or None -> []). See the module docstring."""
    if text is None or not text.strip():
        return []
    entries = []
    for k, part in enumerate(text.split(";")):
        where = f"mask_strategy entry {k + 1} ({part.strip()!r} in {text!r})"
        if not part.strip():
            raise UserError(f"mask_strategy {text!r}: entry {k + 1} is empty (two ';' in a row, or one at an end).")
        fields = [f.strip() for f in part.split(",")]
        if len(fields) > len(FIELDS):
            raise UserError(f"{where}: {len(fields)} numbers, at most {len(FIELDS)}: "
                            f"{', '.join(FIELDS)} (missing ones default to 0,0,0,0,1,0).")
        values = list(DEFAULTS)
        for i, f in enumerate(fields):
            try:
                values[i] = float(f) if i == 5 else int(f)
            except ValueError:
                kind = "a number" if i == 5 else "an integer"
                raise UserError(f"{where}: the {FIELDS[i]} {f!r} is not {kind}.") from None
        entry = MaskEntry(*values)
        problem = _field_problem(entry)
        if problem:
            raise UserError(f"{where}: {problem}.")
        entries.append(entry)
    return entries


def condition_strategy(kind: str, num_frames: int, condition_frame_length: int = 1, references: int = 1,
                       frame_map: FrameMap = DEMO_FRAMES) -> str:
    """The mask strategy of a shorthand, for a target of `num_frames` video frames:

    - ``image``: reference 0's first frame is the target's first frame.
    - ``extend``: the last `condition_frame_length` latent frames of reference 0 become the target's
      first ones (the clip continues).
    - ``connect``: with one reference, its first frame starts the target and its last frame ends it
      (an image: the same frame at both ends); with two, reference 0's *last* frame starts it and
      reference 1's *first* frame ends it, so the target bridges clip 0 into clip 1 (for images,
      first = last: Open-Sora's documented "0;0,1,0,-1,1").
    """
    if kind not in KINDS:
        raise UserError(f"condition={kind!r} is not one of {', '.join(KINDS)}.")
    if num_frames < 1:
        raise UserError(f"num_frames must be >= 1, got {num_frames}.")
    t = frame_map.latent(num_frames)
    if kind == "image":
        return "0,0,0,0,1,0"
    if kind == "extend":
        if not 1 <= condition_frame_length < t:
            raise UserError(
                f"condition=extend with condition_frame_length={condition_frame_length}: the target has "
                f"{frame_map.describe(t, num_frames)}, so between 1 and {t - 1} given frames leave something "
                "to generate.")
        n = condition_frame_length
        return f"0,0,-{n},0,{n},0"
    if t < 2:
        raise UserError(f"condition=connect needs a target of at least 2 latent frames (first and last), "
                        f"got {frame_map.describe(t, num_frames)}.")
    if references == 1:
        return "0,0,0,0,1,0;0,0,-1,-1,1,0"
    if references == 2:
        return "0,0,-1,0,1,0;0,1,0,-1,1,0"
    raise UserError(f"condition=connect takes 1 or 2 references, got {references}.")


def _resolve(e: MaskEntry, ref_latents: int, target_latents: int, where: str, ref_text: str,
             target_text: str) -> tuple[int, int]:
    """(ref_start, target_start) with negative starts counted from the end; UserError if the range
    does not lie inside the reference and the target (whose lengths the texts describe)."""
    rs = e.ref_start + ref_latents if e.ref_start < 0 else e.ref_start
    ts = e.target_start + target_latents if e.target_start < 0 else e.target_start
    if rs < 0 or rs + e.length > ref_latents:
        raise UserError(f"{where} takes latent frames {rs}..{rs + e.length - 1} of reference {e.reference}, "
                        f"which has {ref_text} (too few frames for the strategy).")
    if ts < 0 or ts + e.length > target_latents:
        raise UserError(f"{where} puts frames at {ts}..{ts + e.length - 1} of the target, which has "
                        f"{target_text} (the range lies outside the target).")
    return rs, ts


def check(entries: list[MaskEntry], references: list[int], target_frames: int,
          frame_map: FrameMap = DEMO_FRAMES, loops: int = 1) -> None:
    """UserError for the first entry that cannot apply. `references` are the frame counts (video
    frames) of this prompt's references, in id order; `target_frames` the video frames of one loop.
    In loop i > 0, ids len(references) .. len(references) + i - 1 are the videos of loops 0 .. i-1
    (as Open-Sora appends each generated video to the references)."""
    if loops < 1:
        raise UserError(f"loop must be >= 1, got {loops}.")
    if target_frames < 1:
        raise UserError(f"num_frames must be >= 1, got {target_frames}.")
    target = frame_map.latent(target_frames)
    n = len(references)
    for k, e in enumerate(entries):
        where = f"mask_strategy entry {k + 1} ({e})"
        problem = _field_problem(e)
        if problem:
            raise UserError(f"{where}: {problem}.")
        if e.loop >= loops:
            raise UserError(f"{where} is for loop {e.loop}, but loop={loops} runs loops 0..{loops - 1}: "
                            "it would never apply.")
        if e.reference >= n + e.loop:
            have = f"references 0..{n - 1}" if n else "no reference"
            gen = f" and the {e.loop} generated video(s) of earlier loops (ids {n}..{n + e.loop - 1})" if e.loop else ""
            raise UserError(f"{where} uses reference {e.reference}, but loop {e.loop} has {have}{gen}.")
        frames = references[e.reference] if e.reference < n else target_frames
        if frames < 1:
            raise UserError(f"{where}: reference {e.reference} has no frames.")
        ref = frame_map.latent(frames)
        _resolve(e, ref, target, where, frame_map.describe(ref, frames), frame_map.describe(target, target_frames))


# ---- latents and masks --------------------------------------------------------------------------


def place(z: torch.Tensor, references: list[torch.Tensor], entries: list[MaskEntry], loop: int = 0) -> torch.Tensor:
    """Write the given frames of loop `loop` into z (B, C, T, H, W) in place, the same in every row
    (pass ``z[i:i + 1]`` for prompt i's own references), and return the per-frame edit ratios (T,)
    float32 on z's device: 1 = generated, 0 = given, r = regenerated from noise level r (Open-Sora's
    ``mask``). All ones means nothing is given: the model can then be called without an x_mask (the
    reference's all-True x_mask selects the same modulation). `references` are latents (C, T_r, H, W)
    in id order (encoded references, then each earlier loop's encoded video)."""
    if z.dim() != 5:
        raise ValueError(f"z must be (B, C, T, H, W), got {tuple(z.shape)}")
    t = z.shape[2]
    ratios = torch.ones(t, dtype=torch.float32, device=z.device)
    for k, e in enumerate(entries):
        if e.loop != loop:
            continue
        where = f"mask_strategy entry {k + 1} ({e})"
        if e.reference >= len(references):
            raise UserError(f"{where} uses reference {e.reference}, but {len(references)} are given.")
        ref = references[e.reference]
        if ref.dim() != 4 or ref.shape[0] != z.shape[1] or ref.shape[2:] != z.shape[3:]:
            raise ValueError(f"reference {e.reference} latent {tuple(ref.shape)} does not fit z {tuple(z.shape)}")
        rs, ts = _resolve(e, ref.shape[1], t, where, f"{ref.shape[1]} latent frames", f"{t} latent frames")
        z[:, :, ts:ts + e.length] = ref[:, rs:rs + e.length].to(device=z.device, dtype=z.dtype)
        ratios[ts:ts + e.length] = e.edit_ratio
    return ratios


def x_mask(ratios: torch.Tensor, t, num_timesteps: int = 1000) -> torch.Tensor:
    """STDiT3's x_mask at timestep t (in [0, num_timesteps], after the timestep transform): True =
    generated at this step, False = given (takes timestep 0's modulation). Open-Sora's
    ``mask * num_timesteps >= t`` in float32: ratio 1 is always generated, 0 never, r once t <= r*T.
    ratios (T,) or (B, T); t a number (same shape out) or (B,) (-> (B, T))."""
    t = torch.as_tensor(t, dtype=torch.float32, device=ratios.device)
    if t.dim() == 1:  # per-sample timesteps (the reference's (B,) t): one row per sample
        t = t[:, None]
    return ratios.to(torch.float32) * num_timesteps >= t


@dataclass(frozen=True)
class FrameStep:
    x_mask: torch.Tensor  # bool like ratios: True = generated at this step
    renoise: torch.Tensor  # bool: frames whose given latent is noised to level t at this step


def edit_schedule(ratios: torch.Tensor, timesteps, num_timesteps: int = 1000) -> list[FrameStep]:
    """Per sampling step, Open-Sora's RFLOW.sample mask handling: a frame with ratio r < 1 stays given
    while t > r*T; at the first step with t <= r*T its latent (the reference's) is noised to level t
    and from then on it is denoised like the rest. Ratio 1 frames are never noised (their latent is
    the initial noise, or for an entry with edit ratio 1, the reference latent itself). The sampler,
    to match the reference (its random stream included), does at every step with a mask:
    ``x0 = z.clone(); noise = randn_like(x0)`` (drawn every step, used or not);
    ``z = where(renoise, add_noise(x0, noise, t), x0)``; velocity with ``x_mask``; Euler update;
    ``z = where(x_mask, z, x0)`` (given frames stay as they were)."""
    noised = ratios == 1
    steps = []
    for t in timesteps:
        active = x_mask(ratios, t, num_timesteps)
        steps.append(FrameStep(active, active & ~noised))
        noised = active
    return steps


# ---- loops --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopPlan:
    """`loops` generations of `num_frames` video frames each. Loop i > 0 is conditioned on the last
    `condition_frame_length` latent frames of loop i-1's video (``entries[i - 1]``, reference id
    ``references + i - 1``: Open-Sora's append_generated), and its first `cut` video frames (the
    repeated ones) are dropped when the loops are stitched."""

    loops: int
    num_frames: int
    condition_frame_length: int
    cut: int
    entries: tuple[MaskEntry, ...]

    @property
    def total_frames(self) -> int:
        return self.num_frames + (self.loops - 1) * (self.num_frames - self.cut)


def loop_plan(loop: int, num_frames: int, condition_frame_length: int, frame_map: FrameMap = DEMO_FRAMES,
              references: int = 0, edit_ratio: float = 0.0) -> LoopPlan:
    """The loop structure; `references` is the number of the prompt's own references (the generated
    videos get the ids after them), `edit_ratio` Open-Sora's condition_frame_edit. The continuation
    entries go after the user's strategy (later entries win where they overlap, as in Open-Sora)."""
    if loop < 1:
        raise UserError(f"loop must be >= 1, got {loop}.")
    if num_frames < 1:
        raise UserError(f"num_frames must be >= 1, got {num_frames}.")
    if loop == 1:
        return LoopPlan(1, num_frames, condition_frame_length, 0, ())
    t = frame_map.latent(num_frames)
    n = condition_frame_length
    if not 1 <= n < t:
        raise UserError(
            f"loop={loop} with condition_frame_length={n}: each loop has {frame_map.describe(t, num_frames)}, so "
            f"between 1 and {t - 1} frames can be carried over (each loop must add something).")
    if not 0.0 <= edit_ratio <= 1.0:
        raise UserError(f"condition_frame_edit must be in [0, 1], got {edit_ratio}.")
    cut = frame_map.video(n)
    entries = tuple(MaskEntry(i, references + i - 1, -n, 0, n, float(edit_ratio)) for i in range(1, loop))
    return LoopPlan(loop, num_frames, n, cut, entries)


def stitch(videos, condition_frame_length: int, frame_map: FrameMap = DEMO_FRAMES, dim: int = -3):
    """The loops' videos as one, without the repeated frames: every video after the first loses its
    first frame_map.video(condition_frame_length) frames along `dim` (-3: time in (C, T, H, W) and
    (B, C, T, H, W); pass 0 for (T, H, W, 3) arrays). Tensors or numpy arrays."""
    if not videos:
        raise ValueError("stitch needs at least one video")
    cut = frame_map.video(condition_frame_length) if len(videos) > 1 else 0
    parts = [videos[0]]
    for v in videos[1:]:
        if v.shape[dim] <= cut:
            raise ValueError(f"a loop's video has {v.shape[dim]} frames, not more than the {cut} repeated ones")
        index = [slice(None)] * v.ndim
        index[dim] = slice(cut, None)
        parts.append(v[tuple(index)])
    if isinstance(videos[0], torch.Tensor):
        return torch.cat(parts, dim=dim)
    return np.concatenate(parts, axis=dim)


# ---- prompts ------------------------------------------------------------------------------------


def split_prompt_options(prompt: str) -> tuple[str, list[str] | None, str | None]:
    """'caption{"reference_path": "a.png;b.mp4", "mask_strategy": "0"}' -> (caption, [paths], strategy):
    Open-Sora's JSON-in-prompt syntax (extract_json_from_prompts). Either key may be left out
    (None then); the text before the '{' is the caption."""
    head, brace, tail = prompt.partition("{")
    if not brace:
        return prompt, None, None
    try:
        options = json.loads(brace + tail)
    except json.JSONDecodeError as err:
        raise UserError(f"prompt {prompt!r}: the text from the first '{{' is not valid JSON ({err.msg}); "
                        "a caption cannot contain '{'.") from None
    if not isinstance(options, dict):
        raise UserError(f"prompt {prompt!r}: the JSON after the caption must be an object.")
    unknown = sorted(set(options) - {"reference_path", "mask_strategy"})
    if unknown:
        raise UserError(f"prompt {prompt!r}: unknown key(s) {', '.join(unknown)}; "
                        "the options are reference_path and mask_strategy.")
    for key in options:
        if not isinstance(options[key], str):
            raise UserError(f"prompt {prompt!r}: {key} must be a string.")
    paths = options.get("reference_path")
    if paths is not None:
        paths = [p.strip() for p in paths.split(";")]
        if not all(paths):
            raise UserError(f"prompt {prompt!r}: reference_path has an empty path ('a;b' separates several).")
    return head.rstrip(), paths, options.get("mask_strategy")


def loop_prompts(prompt: str, loops: int) -> list[str]:
    """One caption per loop. '|0|a car in a forest|2|a car in a desert' (Open-Sora's syntax, which must
    start with '|0|') gives loops 0-1 the first caption and loops 2.. the second; any other prompt is
    used for every loop."""
    if not prompt.startswith("|0|"):
        return [prompt] * loops
    parts = prompt.split("|")[1:]
    if len(parts) % 2:
        raise UserError(f"prompt {prompt!r}: '|N|' loop markers must each be followed by a caption.")
    texts = [None] * loops
    starts = []
    for i in range(0, len(parts), 2):
        try:
            starts.append(int(parts[i]))
        except ValueError:
            raise UserError(f"prompt {prompt!r}: loop marker |{parts[i]}| is not an integer.") from None
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise UserError(f"prompt {prompt!r}: loop markers must increase, got {starts}.")
    if starts[-1] >= loops:
        raise UserError(f"prompt {prompt!r}: a caption starts at loop {starts[-1]}, but loop={loops} runs "
                        f"loops 0..{loops - 1}.")
    for j, s in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else loops
        texts[s:end] = [parts[2 * j + 1].strip()] * (end - s)
    return texts


# ---- reading references -------------------------------------------------------------------------


def _crop_box(h: int, w: int, th: int, tw: int, video: bool) -> tuple[int, int, int, int]:
    """Open-Sora's resize_crop_to_fill: scale so the target is covered, then crop the middle.
    Returns (scaled h, scaled w, top, left). The two readers round the offset differently, and this
    keeps both: images round((s - t) / 2) (half to even), videos int((s - t) / 2) (down)."""
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        off = (sw - tw) / 2.0
        return sh, sw, 0, int(off) if video else int(round(off))
    sh, sw = round(h * rw), tw
    off = (sh - th) / 2.0
    return sh, sw, int(off) if video else int(round(off)), 0


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] in float32 with the reference's ops (ToTensor's /255, Normalize(0.5, 0.5))."""
    return x.to(torch.float32).div(255).sub(0.5).div(0.5)


def load_reference(path: str, height: int, width: int) -> torch.Tensor:
    """An image (T = 1) or a video as (3, T, height, width) float32 in [-1, 1], resized to cover the
    target and centre-cropped as Open-Sora's read_from_path(..., transform_name="resize_crop"):
    images with PIL bicubic on uint8 (the same call as the reference), videos with bilinear
    F.interpolate (align_corners=False, no antialias) on [0, 1] floats. Videos are decoded with
    imageio-ffmpeg where the reference uses torchvision (PyAV); both are FFmpeg, RGB24."""
    if height < 1 or width < 1:
        raise UserError(f"the target size must be positive, got {height}x{width}.")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        raise UserError(f"reference {path!r} is a URL: download it and pass the file's path.")
    if not os.path.exists(path):
        raise UserError(f"reference file not found: {path!r}.")
    if not os.path.isfile(path):
        raise UserError(f"reference {path!r} is not a file.")
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        from runner.video import read_video
        try:
            frames = read_video(path)
        except Exception as err:  # imageio raises many kinds for a broken file
            # imageio appends FFmpeg's whole log; its first line says what failed
            first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise UserError(f"cannot read reference video {path!r}: {first.rstrip('.')} (not a video FFmpeg can "
                            "decode).") from None
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise UserError(f"reference video {path!r} has no frames.")
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        sh, sw, i, j = _crop_box(x.shape[2], x.shape[3], height, width, video=True)
        # The reference divides by 255 before resizing and normalises after.
        x = F.interpolate(x.to(torch.float32).div(255), size=(sh, sw), mode="bilinear", align_corners=False)
        x = x[:, :, i:i + height, j:j + width].sub(0.5).div(0.5)
        return x.permute(1, 0, 2, 3).contiguous()
    if ext in IMAGE_EXTENSIONS:
        from PIL import Image
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as err:
            raise UserError(f"cannot read reference image {path!r}: {err}".rstrip() + ".") from None
        sh, sw, i, j = _crop_box(img.size[1], img.size[0], height, width, video=False)
        arr = np.array(img.resize((sw, sh), Image.Resampling.BICUBIC))[i:i + height, j:j + width]
        x = _normalise(torch.from_numpy(np.ascontiguousarray(arr)))  # (H, W, 3)
        return x.permute(2, 0, 1)[:, None].contiguous()
    raise UserError(f"reference {path!r}: unsupported file type {ext or '(none)'!r}; images "
                    f"({', '.join(IMAGE_EXTENSIONS)}) or videos ({', '.join(VIDEO_EXTENSIONS)}).")


# ---- one prompt's conditioning, as the entry point sees it -----------------------------------------


@dataclass
class PromptConditioning:
    """What one prompt of a job is conditioned on, checked and loaded before any work."""

    captions: list[str]  # the caption of each loop
    paths: list[str]
    videos: list[torch.Tensor]  # the loaded references (3, T, H, W) in [-1, 1], in id order
    entries: list[MaskEntry]  # the user's strategy, then each loop's continuation
    plan: LoopPlan

    @property
    def conditioned(self) -> bool:
        return bool(self.entries)

    def key(self) -> dict | None:
        """What the settings key adds for this prompt (None for a plain prompt, whose key stays as
        it was): the references' content, not only their paths, so a reference replaced by another
        file never resumes into the old video."""
        if not self.conditioned and not self.paths:
            return None
        from runner.outputs import file_sha256
        return {"references": [file_sha256(p) for p in self.paths], "mask_strategy": format_strategy(self.entries),
                "loop": self.plan.loops}


def prepare(prompt: str, reference: str | None, mask_strategy: str | None, condition: str | None,
            condition_frame_length: int | None, loops: int, num_frames: int, height: int, width: int,
            frame_map: FrameMap = DEMO_FRAMES, condition_frame_edit: float = 0.0) -> PromptConditioning:
    """Parse, load and check one prompt's conditioning (UserError before any work). A prompt's own
    options (JSON after the caption) override the job's `reference` / `mask_strategy`."""
    # Only a prompt that names an option is parsed: any other text (braces included) stays verbatim.
    if any(f'"{k}"' in prompt for k in ("reference_path", "mask_strategy")):
        text, paths, strategy = split_prompt_options(prompt)
    else:
        text, paths, strategy = prompt, None, None
    if paths is None:
        paths = [p.strip() for p in reference.split(";")] if reference else []
        if not all(paths):
            raise UserError(f"reference={reference!r} has an empty path ('a.png;b.mp4' separates several).")
    strategy = strategy if strategy is not None else mask_strategy
    cfl = frame_map.chunk_latents if condition_frame_length is None else condition_frame_length
    if condition is not None:
        if strategy:
            raise UserError(f"condition={condition} and mask_strategy={strategy!r} both say where the reference "
                            "goes; give one of them.")
        if not paths:
            raise UserError(f"condition={condition} needs a reference: reference=PATH (an image or a video).")
        strategy = condition_strategy(condition, num_frames, cfl, len(paths), frame_map)
    if paths and not strategy:
        # Open-Sora silently ignores such references; a user who gives one means to use it.
        raise UserError(f"reference {';'.join(paths)!r} is given without saying where it goes: add condition=image "
                        "(first frame), condition=extend, condition=connect, or mask_strategy='...'.")
    entries = parse_mask_strategy(strategy)
    plan = loop_plan(loops, num_frames, cfl, frame_map, references=len(paths), edit_ratio=condition_frame_edit)
    entries = entries + list(plan.entries)
    # Read now (a missing or broken file stops the job before any work); check needs their frame counts.
    videos = [load_reference(p, height, width) for p in paths]
    check(entries, [v.shape[1] for v in videos], num_frames, frame_map, loops)
    return PromptConditioning(loop_prompts(text, loops), paths, videos, entries, plan)
