import dataclasses
import itertools
import time

import numpy as np
import pytest
import torch

from runner.demo import data as dd


def _specs(seed, n, split="train"):
    rng = np.random.default_rng(seed)
    return [dd.sample_spec(rng, split) for _ in range(n)]


def test_palette_and_backgrounds_are_separable():
    rgb = np.array(list(dd.PALETTE.values()), dtype=float)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)) > 120
    for lo, hi in dd.BACKGROUND_RANGE.values():
        greys = np.linspace(lo, hi, 64)[:, None].repeat(3, 1)
        assert np.linalg.norm(greys[:, None] - rgb[None], axis=-1).min() > 110


@pytest.mark.parametrize("size", [32, 64])
def test_render_shape_and_dtype(size):
    clips = dd.render_batch(_specs(0, 6), num_frames=16, size=size)
    assert clips.shape == (6, 16, size, size, 3) and clips.dtype == np.uint8
    one = dd.render_clip(_specs(0, 1)[0], num_frames=5, size=size)
    assert one.shape == (5, size, size, 3)


def test_same_seed_same_clips_different_seed_different_clips():
    a, b, c = _specs(1, 8), _specs(1, 8), _specs(2, 8)
    assert a == b and a != c
    assert np.array_equal(dd.render_batch(a), dd.render_batch(b))
    assert not np.array_equal(dd.render_batch(a), dd.render_batch(c))
    va, ca = dd.make_batch(np.random.default_rng(3), 4)
    vb, cb = dd.make_batch(np.random.default_rng(3), 4)
    assert torch.equal(va, vb) and ca == cb


def test_make_batch_layout_and_range():
    video, captions = dd.make_batch(np.random.default_rng(0), 5, num_frames=8, size=32)
    assert video.shape == (5, 3, 8, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and len(captions) == 5


def test_heldout_never_sampled_in_train():
    seen = {(s.colour, s.shape, s.motion) for s in _specs(4, 5000, "train")}
    assert not any(dd.is_heldout(*c) for c in seen)
    assert seen == set(dd.TRAIN_COMBOS)  # and all the rest is reachable
    held = {(s.colour, s.shape, s.motion) for s in _specs(5, 1000, "heldout")}
    assert held == set(dd.HELDOUT_COMBOS)
    with pytest.raises(ValueError):
        dd.sample_spec(np.random.default_rng(0), "test")


def test_heldout_design_keeps_every_word_in_training():
    for i, vocab in enumerate([dd.COLOURS, dd.SHAPES, dd.MOTIONS]):
        assert {c[i] for c in dd.TRAIN_COMBOS} == set(vocab)


def test_heldout_captions_parse_render_and_cover_the_holdout():
    caps = dd.HELDOUT_CAPTIONS
    assert 16 <= len(caps) <= 24 and len(set(caps)) == len(caps)
    pairs_cm, pairs_cs = set(), set()
    for text in caps:
        p = dd.parse_caption(text)
        assert None not in p.values()
        assert p["motion"] in dd.MOVING and dd.is_heldout(p["colour"], p["shape"], p["motion"])
        pairs_cm.add((p["colour"], p["motion"]))
        pairs_cs.add((p["colour"], p["shape"]))
        for size in (32, 64):
            clip = dd.render_clip(dd.spec_from_caption(text), 16, size)
            assert clip.shape == (16, size, size, 3)
    assert set(dd.HELDOUT_COLOUR_MOTION) <= pairs_cm
    assert set(dd.HELDOUT_COLOUR_SHAPE) <= pairs_cs
    assert {dd.parse_caption(t)["background"] for t in caps} == set(dd.BACKGROUNDS)


def test_caption_round_trip():
    for colour, shape, motion, bg in itertools.product(
        dd.COLOURS, dd.SHAPES, dd.MOTIONS, dd.BACKGROUNDS + (None,)
    ):
        fields = {"colour": colour, "shape": shape, "motion": motion, "background": bg}
        text = dd.make_caption(fields)
        assert dd.parse_caption(text) == fields
    s = _specs(6, 1)[0]
    assert dd.make_caption(dd.parse_caption(s.caption)) == s.caption
    assert dd.parse_caption("a red circle moves left on a dark background") == {
        "colour": "red", "shape": "circle", "motion": "left", "background": "dark"}
    assert dd.parse_caption("a blue square stays still")["motion"] == "still"
    assert dd.parse_caption("Something green.") == {
        "colour": "green", "shape": None, "motion": None, "background": None}


def _plain(spec):
    return dataclasses.replace(spec, background="dark")


@pytest.mark.parametrize("size", [32, 64])
def test_motion_travels_clearly_and_stays_inside(size):
    specs = [_plain(s) for s in _specs(7, 200)]
    clips = dd.render_batch(specs, 16, size).astype(int)
    dark = round(dd.BACKGROUND_RANGE["dark"][0])
    # The outermost pixel ring is background in every frame: the shape never touches the edge.
    rings = [clips[:, :, 0], clips[:, :, -1], clips[:, :, :, 0], clips[:, :, :, -1]]
    border = np.concatenate(rings, axis=2)
    assert (border == dark).all()
    for s, clip in zip(specs, clips):
        mask = (np.abs(clip - dark).sum(-1) > 150)  # fully covered pixels
        ys, xs = np.nonzero(mask[0])
        ye, xe = np.nonzero(mask[-1])
        moved = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()]) / size
        dx, dy = dd.DIRECTIONS[s.motion]
        along = moved @ np.array([dx, dy])
        if s.motion == "still":
            assert np.abs(moved).max() < 1e-9
            assert (clip == clip[0]).all()
        else:
            assert 0.37 < along < 0.53  # 40-50% of the frame, up to pixel rounding
            assert abs(moved @ np.array([dy, dx])) < 0.05


def test_textured_background_is_static_and_distinct():
    s = dataclasses.replace(_specs(8, 1)[0], background="textured", motion="still", travel=0.0)
    clip = dd.render_clip(s).astype(int)
    corner = clip[:, :4, :4]  # a background patch
    assert (corner == corner[0]).all() and corner.std() > 3
    plain = dd.render_clip(dataclasses.replace(s, background="dark"))
    assert not np.array_equal(clip, plain)


def test_invalid_spec_raises():
    with pytest.raises(ValueError):
        dd.render_clip(dd.ClipSpec("red", "circle", "right", "dark", 0.5, 0.5, 0.15, 0.5))
    with pytest.raises(ValueError):
        dd.render_clip(dd.ClipSpec("pink", "circle", "still", "dark"))


def test_render_is_fast():
    specs = _specs(9, 64)
    best = min(_timed(lambda: dd.render_batch(specs, 16, 32)) for _ in range(3))
    assert best < 0.5, best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_edge_start_puts_moving_shapes_near_the_far_edge():
    rng = np.random.default_rng(11)
    specs = [dd.sample_spec(rng, "train", start="edge") for _ in range(300)]
    moving = [s for s in specs if s.motion != "still"]
    assert len(moving) > 150
    for s in moving:
        dx, dy = dd.DIRECTIONS[s.motion]
        lo, hi = s.radius + dd.MARGIN, 1 - s.radius - dd.MARGIN
        along = s.x0 if dx else s.y0
        d = dx or dy
        # starts within the band next to the edge it moves away from; the path fits in the frame
        assert (hi - dd.EDGE_BAND <= along <= hi) if d < 0 else (lo <= along <= lo + dd.EDGE_BAND)
        assert dd.EDGE_TRAVEL_RANGE[0] <= s.travel <= dd.EDGE_TRAVEL_RANGE[1]
        s.validate()
    dd.render_batch(moving[:8], 8, 32)
    with pytest.raises(ValueError, match="start must be one of"):
        dd.sample_spec(rng, "train", start="middle")


def test_inside_start_moves_at_edge_speed_from_anywhere_its_path_fits():
    rng = np.random.default_rng(12)
    moving = [s for s in (dd.sample_spec(rng, "train", start="inside") for _ in range(300)) if s.motion != "still"]
    middle = 0
    for s in moving:
        dx, dy = dd.DIRECTIONS[s.motion]
        lo, hi = s.radius + dd.MARGIN, 1 - s.radius - dd.MARGIN
        along, d = (s.x0 if dx else s.y0), dx or dy
        assert dd.EDGE_TRAVEL_RANGE[0] <= s.travel <= dd.EDGE_TRAVEL_RANGE[1]
        assert lo <= along + min(d, 0) * s.travel and along + max(d, 0) * s.travel <= hi  # the path fits
        s.validate()
        middle += (hi - dd.EDGE_BAND > along) if d < 0 else (along > lo + dd.EDGE_BAND)  # not an edge start
    assert middle > 0.6 * len(moving)


def test_through_start_leaves_the_frame_where_its_path_runs_out():
    rng = np.random.default_rng(13)
    moving = [s for s in (dd.sample_spec(rng, "train", start="through") for _ in range(300)) if s.motion != "still"]
    clips = dd.render_batch(moving, 8, 32)
    ends = np.array([s.centres(2)[1] for s in moving])
    radius = np.array([s.radius for s in moving])[:, None]
    gone = ((ends - radius < 0) | (ends + radius > 1)).any(1)  # past the border at the last frame
    assert 0.2 < gone.mean() < 0.9
    for s, clip in zip(moving, clips):
        assert s.leaves and dd.EDGE_TRAVEL_RANGE[0] <= s.travel <= dd.EDGE_TRAVEL_RANGE[1]
        assert (s.centres(1) - s.radius >= 0).all() and (s.centres(1) + s.radius <= 1).all()  # starts inside
    # a shape at least a quarter out at the end shows less of its colour in the last frame than the first
    area = lambda f, c: (np.abs(f.astype(int) - dd.PALETTE[c]).sum(-1) < 60).sum()
    half_out = ((ends < radius / 2) | (ends > 1 - radius / 2)).any(1)
    out = [i for i in np.flatnonzero(half_out) if moving[i].background != "textured"]
    assert out and all(area(clips[i][-1], moving[i].colour) < area(clips[i][0], moving[i].colour) for i in out)
    with pytest.raises(ValueError, match="leaves the frame"):
        dataclasses.replace(moving[int(np.flatnonzero(gone)[0])], leaves=False).validate()


def test_per_sample_starts_draw_the_same_numbers():
    # a batch mixing starts is, sample for sample, the one-start batch's clip where the starts agree
    starts = ["edge", "inside", "anywhere", "through"] * 4
    mixed = dd.make_batch(np.random.default_rng(3), 16, 8, 16, start=starts)
    edge = dd.make_batch(np.random.default_rng(3), 16, 8, 16, start="edge")
    assert mixed[1] == edge[1]
    same = torch.tensor([s == "edge" for s in starts])
    assert torch.equal(mixed[0][same], edge[0][same]) and not torch.equal(mixed[0][~same], edge[0][~same])
    with pytest.raises(ValueError, match="3 starts for a batch of 4"):
        dd.make_batch(np.random.default_rng(3), 4, 8, 16, start=["edge"] * 3)


def test_default_start_is_anywhere_and_edge_start_gives_direction_a_placement():
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    assert [dd.sample_spec(a) for _ in range(20)] == [dd.sample_spec(b, "train", "anywhere") for _ in range(20)]

    def mean_clip(caption, start):
        rng = np.random.default_rng(0)
        specs = [dd.spec_from_caption(caption, rng, start=start) for _ in range(200)]
        return dd.to_model_range(dd.render_batch(specs, 8, 16)).mean(0)

    left, right = "a green circle moves left", "a green circle moves right"
    for start, placed in (("anywhere", False), ("edge", True)):
        diff = mean_clip(left, start) - mean_clip(right, start)
        frame_avg = diff.mean(1).norm() / diff.norm()
        assert (frame_avg > 0.2) if placed else (frame_avg < 1e-4)
