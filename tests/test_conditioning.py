"""runner.conditioning: Open-Sora 1.2's mask strategies, references, masks and loops (no model).

The expected values are worked out by hand from the reference's semantics (latent-frame indices,
defaults 0,0,0,0,1,0, negative starts from the end, later entries win, edit ratio r = given until
t <= r * 1000)."""

import numpy as np
import pytest
import torch
from PIL import Image

from runner.conditioning import (
    DEMO_FRAMES, OPENSORA_FRAMES, MaskEntry, check, condition_strategy, edit_schedule, format_strategy,
    load_reference, loop_plan, loop_prompts, parse_mask_strategy, place, split_prompt_options, stitch, x_mask,
)
from runner.config import UserError
from runner.video import read_video, write_video

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parser -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("", []),
    (None, []),
    ("0", [MaskEntry(0, 0, 0, 0, 1, 0.0)]),  # image-to-video: every default
    ("0,0,0,-8,8", [MaskEntry(0, 0, 0, -8, 8, 0.0)]),  # 8 frames at the target's end
    ("0;0,1,0,-1,1", [MaskEntry(), MaskEntry(0, 1, 0, -1, 1, 0.0)]),  # connect two images
    ("1,2,-3,4,5,0.25", [MaskEntry(1, 2, -3, 4, 5, 0.25)]),
    (" 0 , 1 ;2", [MaskEntry(0, 1), MaskEntry(2)]),
])
def test_parse(text, expected):
    assert parse_mask_strategy(text) == expected


def test_format_round_trip():
    entries = [MaskEntry(0, 0, -5, 0, 5, 0.0), MaskEntry(1, 2, 3, -1, 1, 0.4)]
    assert format_strategy(entries) == "0,0,-5,0,5,0;1,2,3,-1,1,0.4"
    assert parse_mask_strategy(format_strategy(entries)) == entries


@pytest.mark.parametrize("text, words", [
    ("0;;1", "entry 2 is empty"),
    ("0;", "entry 2 is empty"),
    ("0,0,0,0,1,0,7", "at most 6"),
    ("a", "loop id 'a' is not an integer"),
    ("0,0,0,0,1.5", "length '1.5' is not an integer"),
    ("0,0,0,0,x", "length 'x'"),
    ("0,0,0,0,1,fast", "edit ratio 'fast' is not a number"),
    ("0,0,0,0,0", "length must be at least 1"),
    ("0,0,0,0,-2", "length must be at least 1"),
    ("0,0,0,0,1,1.5", "edit ratio must be in [0, 1]"),
    ("0,0,0,0,1,-0.1", "edit ratio must be in [0, 1]"),
    ("0,0,0,0,1,nan", "edit ratio must be in [0, 1]"),
    ("-1", "loop id must be >= 0"),
    ("0,-1", "reference id must be >= 0"),
])
def test_parse_errors(text, words):
    with pytest.raises(UserError, match="mask_strategy") as err:
        parse_mask_strategy(text)
    assert words in str(err.value)


# ---- shorthands ---------------------------------------------------------------------------------


def test_shorthands():
    assert condition_strategy("image", 8) == "0,0,0,0,1,0"
    assert condition_strategy("extend", 8, 4) == "0,0,-4,0,4,0"
    assert condition_strategy("extend", 51, 5, frame_map=OPENSORA_FRAMES) == "0,0,-5,0,5,0"
    assert condition_strategy("connect", 8) == "0,0,0,0,1,0;0,0,-1,-1,1,0"
    assert condition_strategy("connect", 8, references=2) == "0,0,-1,0,1,0;0,1,0,-1,1,0"
    # what they mean, placed: extend 4 of 8 takes frames 4..7 of an 8-frame clip as frames 0..3
    z = torch.zeros(1, 1, 8, 1, 1)
    clip = torch.arange(8.0).reshape(1, 8, 1, 1) + 1
    ratios = place(z, [clip], parse_mask_strategy(condition_strategy("extend", 8, 4)))
    assert z.flatten().tolist() == [5, 6, 7, 8, 0, 0, 0, 0]
    assert ratios.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    z = torch.zeros(1, 1, 8, 1, 1)
    place(z, [clip, clip + 10], parse_mask_strategy(condition_strategy("connect", 8, references=2)))
    assert z.flatten().tolist() == [8, 0, 0, 0, 0, 0, 0, 11]  # clip 0's last, then clip 1's first


@pytest.mark.parametrize("args, words", [
    (("video", 8), "condition='video' is not one of image, extend, connect"),
    (("extend", 8, 8), "between 1 and 7"),
    (("extend", 8, 0), "between 1 and 7"),
    (("extend", 17, 5), "5 latent frames (17 video frames)"),  # Open-Sora: 17 frames are 5 latents
    (("connect", 1), "at least 2 latent frames"),
    (("connect", 8, 1, 3), "1 or 2 references"),
])
def test_shorthand_errors(args, words):
    frame_map = OPENSORA_FRAMES if args[:3] == ("extend", 17, 5) else DEMO_FRAMES
    with pytest.raises(UserError) as err:
        condition_strategy(*args, frame_map=frame_map)
    assert words in str(err.value)


# ---- checking against references and target -----------------------------------------------------


def test_check_accepts():
    check(parse_mask_strategy("0;0,1,-2,-2,2,0.5"), [1, 5], 8)
    # Open-Sora: a 34-frame clip is 10 latent frames, a 51-frame target 15
    check(parse_mask_strategy("0,0,-5,0,5;0,0,0,-1,1"), [34], 51, OPENSORA_FRAMES)
    # loop 2 may use the videos of loops 0 and 1 (ids 1 and 2 after one reference)
    check(parse_mask_strategy("2,2,-2,0,2;2,1,0,-1,1"), [1], 8, loops=3)


@pytest.mark.parametrize("entries, refs, target, kw, words", [
    ("0", [], 8, {}, "uses reference 0, but loop 0 has no reference"),
    ("0,2", [1, 1], 8, {}, "uses reference 2, but loop 0 has references 0..1"),
    ("1,2", [1], 8, {"loops": 2}, "generated video(s) of earlier loops (ids 1..1)"),
    ("0,0,0,0,4", [3], 8, {}, "latent frames 0..3 of reference 0, which has 3 frames (too few"),
    ("0,0,-4,0,4", [3], 8, {}, "latent frames -1..2 of reference 0"),
    ("0,0,0,0,6", [17], 51, {"frame_map": OPENSORA_FRAMES}, "which has 5 latent frames (17 video frames)"),
    ("0,0,0,6,4", [8], 8, {}, "puts frames at 6..9 of the target, which has 8 frames (the range lies outside"),
    ("0,0,0,-9,1", [8], 8, {}, "puts frames at -1..-1 of the target"),
    ("1", [1], 8, {}, "is for loop 1, but loop=1 runs loops 0..0"),
    (MaskEntry(length=0), [1], 8, {}, "length must be at least 1"),
    (MaskEntry(edit_ratio=1.5), [1], 8, {}, "edit ratio must be in [0, 1]"),
])
def test_check_errors(entries, refs, target, kw, words):
    entries = [entries] if isinstance(entries, MaskEntry) else parse_mask_strategy(entries)
    with pytest.raises(UserError, match=r"mask_strategy entry 1 \(") as err:
        check(entries, refs, target, **kw)
    assert words in str(err.value)


# ---- latents, masks, edit ratios ----------------------------------------------------------------


def test_place_demo():
    """1 video frame = 1 latent frame; every row gets the frames; later entries win; only this loop."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 2, 2, generator=g)
    before = z.clone()
    image, clip = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 5, 2, 2, generator=g)
    entries = parse_mask_strategy("0;0,1,-2,-2,2,0.5;0,1,0,0,1,0.25;1,1,0,1,3")
    ratios = place(z, [image, clip], entries, loop=0)
    assert ratios.dtype == torch.float32 and ratios.tolist() == [0.25, 1, 1, 1, 1, 1, 0.5, 0.5]
    for row in range(2):
        assert torch.equal(z[row, :, 0], clip[:, 0])  # the third entry overwrote the image
        assert torch.equal(z[row, :, 6:8], clip[:, 3:5])
        assert torch.equal(z[row, :, 1:6], before[row, :, 1:6])
    # loop 1: only its own entry
    z = before.clone()
    assert place(z, [image, clip], entries, loop=1).tolist() == [1, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(z[:, :, 1:4], clip[None, :, 0:3].expand(2, -1, -1, -1, -1))


def test_place_opensora():
    """VAE 1.2: a 34-frame reference encodes to 10 latent frames, a 51-frame target has 15; the strategy
    indexes latent frames, so "0,0,-5,0,5" puts the reference's last chunk first."""
    assert OPENSORA_FRAMES.latent(34) == 10 and OPENSORA_FRAMES.latent(51) == 15
    assert OPENSORA_FRAMES.latent(1) == 1 and OPENSORA_FRAMES.latent(40) == 12  # 17 + 17 + 6 -> 5 + 5 + 2
    entries = parse_mask_strategy("0,0,-5,0,5;0,0,0,-1,1,0.5")
    check(entries, [34], 51, OPENSORA_FRAMES)
    ref = torch.randn(4, 10, 3, 2)
    z = torch.zeros(1, 4, 15, 3, 2, dtype=torch.bfloat16)
    ratios = place(z, [ref], entries)
    assert ratios.tolist() == [0] * 5 + [1] * 9 + [0.5]
    assert torch.equal(z[0, :, 0:5], ref[:, 5:10].bfloat16()) and torch.equal(z[0, :, 14], ref[:, 0].bfloat16())
    assert not z[0, :, 5:14].any()


def test_place_errors():
    z = torch.zeros(1, 3, 4, 2, 2)
    with pytest.raises(UserError, match="uses reference 1, but 1 are given"):
        place(z, [torch.zeros(3, 4, 2, 2)], parse_mask_strategy("0,1"))
    with pytest.raises(UserError, match="which has 2 latent frames"):
        place(z, [torch.zeros(3, 2, 2, 2)], parse_mask_strategy("0,0,0,0,3"))
    with pytest.raises(ValueError, match="does not fit"):
        place(z, [torch.zeros(3, 4, 4, 4)], parse_mask_strategy("0"))


def test_x_mask_and_edit_schedule():
    """Ratios 0 (given), 0.5 (edited), 1 (generated) over timesteps 1000, 750, 500, 250: the edited
    frame joins at t = 500 (500 >= 500), is noised then, once; the generated one is never noised."""
    ratios = torch.tensor([0.0, 0.5, 1.0])
    steps = edit_schedule(ratios, [1000.0, 750.0, 500.0, 250.0])
    assert [s.x_mask.tolist() for s in steps] == [[False, False, True]] * 2 + [[False, True, True]] * 2
    assert [s.renoise.tolist() for s in steps] == [[False] * 3] * 2 + [[False, True, False], [False] * 3]
    # per-sample timesteps give one row per sample
    assert x_mask(ratios, torch.tensor([600.0, 400.0])).tolist() == [[False, False, True], [False, True, True]]
    assert x_mask(torch.ones(5), 1000.0).all()  # nothing given: all generated


# ---- loops --------------------------------------------------------------------------------------


def test_loop_plan_and_stitch_demo():
    plan = loop_plan(3, 8, 2, references=1)
    assert plan.cut == 2 and plan.total_frames == 8 + 2 * 6
    # loop i continues from the last 2 frames of loop i-1's video (reference id 1 + i - 1)
    assert format_strategy(plan.entries) == "1,1,-2,0,2,0;2,2,-2,0,2,0"
    check(list(plan.entries), [1], 8, loops=3)
    # three loops whose first 2 frames repeat the previous loop's last 2: stitched without repeats
    videos = [torch.arange(6.0 * i, 6.0 * i + 8).reshape(1, 8, 1, 1).expand(3, 8, 2, 2) for i in range(3)]
    out = stitch(videos, 2)
    assert out.shape == (3, 20, 2, 2)
    assert out[0, :, 0, 0].tolist() == list(range(20))
    # batched tensors and (T, H, W, 3) arrays
    assert stitch([v[None] for v in videos], 2).shape == (1, 3, 20, 2, 2)
    assert stitch([np.zeros((8, 2, 2, 3), np.uint8)] * 3, 2, dim=0).shape == (20, 2, 2, 3)
    assert loop_plan(1, 8, 2).total_frames == 8 and loop_plan(1, 8, 2).entries == ()


def test_loop_plan_opensora():
    """Open-Sora 1.2: 51-frame loops carrying 5 latent frames (one chunk) drop 17 video frames at each
    seam (dframe_to_frame), so 3 loops give 51 + 2 * 34 = 119 frames."""
    plan = loop_plan(3, 51, 5, OPENSORA_FRAMES, references=0, edit_ratio=0.0)
    assert plan.cut == 17 and plan.total_frames == 119
    assert plan.entries[0] == MaskEntry(1, 0, -5, 0, 5, 0.0)
    videos = [torch.zeros(1, 3, 51, 2, 2)] * 3
    assert stitch(videos, 5, OPENSORA_FRAMES).shape[2] == 119


@pytest.mark.parametrize("args, kw, words", [
    ((0, 8, 2), {}, "loop must be >= 1"),
    ((2, 8, 8), {}, "between 1 and 7 frames can be carried over"),
    ((2, 8, 0), {}, "between 1 and 7"),
    ((2, 51, 3), {"frame_map": OPENSORA_FRAMES}, "Use a multiple of 5"),
    ((2, 8, 2), {"edit_ratio": 2.0}, "condition_frame_edit must be in [0, 1]"),
])
def test_loop_plan_errors(args, kw, words):
    with pytest.raises(UserError) as err:
        loop_plan(*args, **kw)
    assert words in str(err.value)


# ---- prompts ------------------------------------------------------------------------------------


def test_prompt_options():
    p = 'A breathtaking sunrise scene.{"reference_path": "a.png;b.png","mask_strategy": "0;0,1,0,-1,1"}'
    assert split_prompt_options(p) == ("A breathtaking sunrise scene.", ["a.png", "b.png"], "0;0,1,0,-1,1")
    assert split_prompt_options('a cat {"mask_strategy": "0"}') == ("a cat", None, "0")
    assert split_prompt_options("a cat") == ("a cat", None, None)
    with pytest.raises(UserError, match="not valid JSON"):
        split_prompt_options('a cat {"reference_path": "a.png"')
    with pytest.raises(UserError, match="unknown key.*seed"):
        split_prompt_options('a cat {"seed": "1"}')
    with pytest.raises(UserError, match="reference_path must be a string"):
        split_prompt_options('a cat {"reference_path": 3}')


def test_loop_prompts():
    assert loop_prompts("|0|a car in a forest.|2| a car in a desert.", 4) == [
        "a car in a forest.", "a car in a forest.", "a car in a desert.", "a car in a desert."]
    assert loop_prompts("a car", 2) == ["a car", "a car"]
    with pytest.raises(UserError, match="starts at loop 3, but loop=3"):
        loop_prompts("|0|a|3|b", 3)
    with pytest.raises(UserError, match="must increase"):
        loop_prompts("|0|a|2|b|1|c", 3)
    with pytest.raises(UserError, match="followed by a caption"):
        loop_prompts("|0|a|2", 3)


# ---- reading references -------------------------------------------------------------------------


def _noise(h, w, t=None, seed=0):
    shape = (h, w, 3) if t is None else (t, h, w, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _scaled(a):
    return torch.from_numpy(a.astype(np.float32) / 255 * 2 - 1)


def test_image_crop_is_central(tmp_path):
    """16x19 -> 16x16 needs no resize (scale 1): the crop starts at round(3 / 2) = 2, exactly."""
    img = _noise(16, 19)
    Image.fromarray(img).save(tmp_path / "r.png")
    x = load_reference(str(tmp_path / "r.png"), 16, 16)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], _scaled(img[:, 2:18]).permute(2, 0, 1), atol=1e-6)


def _bands(h, w, t=None):
    """Red | green | blue vertical bands, the green one the middle half."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4: 3 * w // 4, 1] = 255
    a[:, 3 * w // 4:, 2] = 255
    return a if t is None else np.repeat(a[None], t, 0)


def test_image_resize_crop(tmp_path):
    """A 32x64 image to 12x12: scaled to 12x24, the middle 12 columns (the green band) kept."""
    Image.fromarray(_bands(32, 64)).save(tmp_path / "r.png")
    x = load_reference(str(tmp_path / "r.png"), 12, 12)[:, 0]
    assert x.shape == (3, 12, 12) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, :, 1:11], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 12, 10))
    # bicubic (as the reference) lets the edge columns take in a little of the next band: as much red
    # on the left as blue on the right only if the crop is central
    red, blue = x[0, :, 0] + 1, x[2, :, 11] + 1
    assert 0 < red.min() and torch.equal(red, blue) and torch.equal(x[2, :, 0], x[0, :, 11])


def test_video_crop_is_central(tmp_path):
    """Videos crop at int(3 / 2) = 1 (the reference's video reader rounds down)."""
    path = str(tmp_path / "r.mp4")
    write_video(path, _noise(16, 19, t=3))
    decoded = read_video(path)
    x = load_reference(path, 16, 16)
    assert x.shape == (3, 3, 16, 16)
    assert torch.allclose(x, _scaled(decoded[:, :, 1:17]).permute(3, 0, 1, 2), atol=1e-6)


def test_video_resize_crop(tmp_path):
    path = str(tmp_path / "r.mp4")
    write_video(path, _bands(32, 64, t=2))
    x = load_reference(path, 12, 12)  # scaled to 12x24, columns 6..17 kept: the green band
    assert x.shape == (3, 2, 12, 12)
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None, None]
    assert (x - green).abs().max() < 0.05  # bilinear without antialias: no bleed from the other bands
    x = load_reference(path, 12, 14)  # columns 5..18: one column of red and one of blue
    assert x[0, :, :, 0].min() > 0.9 and x[2, :, :, 13].min() > 0.9 and (x[:, :, :, 1:13] - green).abs().max() < 0.05


def test_reference_errors(tmp_path):
    with pytest.raises(UserError, match="reference file not found"):
        load_reference(str(tmp_path / "missing.png"), 8, 8)
    with pytest.raises(UserError, match="is not a file"):
        load_reference(str(tmp_path), 8, 8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read reference image"):
        load_reference(str(tmp_path / "bad.png"), 8, 8)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(UserError, match="cannot read reference video"):
        load_reference(str(tmp_path / "bad.mp4"), 8, 8)
    (tmp_path / "r.gif").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match="unsupported file type '.gif'"):
        load_reference(str(tmp_path / "r.gif"), 8, 8)
    with pytest.raises(UserError, match="is a URL"):
        load_reference("https://example.com/a.mp4", 8, 8)
