"""The evaluator's reference-frame modes (runner.demo.evaluate): the continuation clips are generated
from their own first frames and judged against themselves; loops are stitched and their seams judged.
A tiny random model: this checks the plumbing; the shipped model's scores are in test_demo_model."""

import numpy as np
import pytest
import torch

from runner.demo import data as demo_data
from runner.demo import evaluate as ev
from runner.demo import judge
from runner.families import build_pipeline
from runner.video import to_uint8
from tests.helpers import make_cfg

SETTINGS = ("model=demo-random", "num_frames=4", "height=16", "width=16", "sampler.num_steps=2", "progress=false")


@pytest.fixture(scope="module")
def tiny():
    cfg = make_cfg(*SETTINGS)
    return cfg, build_pipeline(cfg.model, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("given", [1, 3])
def test_continuations_keep_the_clips_first_frames_and_judge_against_the_clip(tiny, monkeypatch, given):
    cfg, pipe = tiny
    specs, clips = ev.continuation_clips(3, cfg.num_frames, cfg.height)
    assert all(s.motion != "still" for s in specs) and clips.shape == (3, 4, 16, 16, 3)
    seen, original = [], judge.continuation

    def recording(video, source, caption, k):
        seen.append((video, source, caption, k))
        return original(video, source, caption, k)

    monkeypatch.setattr(judge, "continuation", recording)
    items = ev.run_continuations(pipe, cfg, given, specs, clips)
    assert len(items) == 3 and [c for _, _, c, _ in seen] == [s.caption for s in specs]
    for (video, source, _, k), clip in zip(seen, clips):
        assert k == given and np.array_equal(source, clip)
        assert np.array_equal(video[:given], clip[:given])  # given frames come out as they went in
        assert not np.array_equal(video[given:], clip[given:])  # a random model does not continue it
    score = ev.score_continuations(items)
    assert score["clips"] == 3 and 0 <= score["accuracy"] <= score["position"] <= 1


def test_loops_are_stitched_and_their_seams_judged(tiny, monkeypatch):
    cfg, pipe = tiny
    seen, original = [], judge.seams

    def recording(video, caption, loop_frames, cut):
        seen.append((video.shape, loop_frames, cut))
        return original(video, caption, loop_frames, cut)

    monkeypatch.setattr(judge, "seams", recording)
    captions = ("a red circle moves left on a dark background", "a blue square moves up on a light background")
    items = ev.run_loops(pipe, cfg, 3, captions)
    assert seen == [((4 + 2 * 3, 16, 16, 3), 4, 1)] * 2  # each later loop adds 3 new frames
    score = ev.score_loops(items, ["left", "up"])
    assert score["videos"] == 2 and score["frames"] == 10 and len(score["loop_motion"]) == 3


def test_given_frames_is_condition_extend():
    video = torch.zeros(3, 8, 4, 4)
    plan = ev.given_frames(video, 4, 1, 8)
    assert [str(e) for e in plan.entries] == ["0,0,0,0,4,0"] and plan.videos[0].shape[1] == 4
    plan = ev.given_frames(video, 0, 3, 8)
    assert not plan.videos and [str(e) for e in plan.entries] == ["1,0,-1,0,1,0", "2,1,-1,0,1,0"]


@pytest.mark.parametrize("args,words", [(["--given", "99"], "--given takes 1 to"), (["--loop", "0"], "--loop"),
                                        (["--denoise", "0"], r"levels in \(0, 1\]"),
                                        (["--denoise", "0.001", "--clips", "1"], "below the sampler's last step")])
def test_bad_evaluator_arguments(args, words):
    with pytest.raises(SystemExit, match=words):
        ev.main(["model=demo-random", *args])


def test_first_step_at_a_noise_level():
    ts = [1000.0, 600.0, 200.0]
    assert [ev.first_step_at(ts, lv, 1000) for lv in (1.0, 0.7, 0.6, 0.5, 0.2)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="below the sampler's last step"):
        ev.first_step_at(ts, 0.1, 1000)


@pytest.mark.parametrize("level", [0.3, 0.8])
def test_denoise_starts_from_the_clip_noised_to_the_level(level, monkeypatch):
    """A model that predicts no velocity leaves the start as it is: the clip noised to the sampler's
    step at `level` with the seed's noise. An oracle that knows the clip brings it back exactly, so
    every shape is kept (the judge reads every training clip's shape right)."""
    cfg = make_cfg("model=demo-random", "num_frames=4", "height=32", "width=32", "sampler.num_steps=5",
                   "progress=false")
    pipe = build_pipeline(cfg.model, torch.device("cpu"), torch.float32)
    specs, clips = ev.continuation_clips(6, 4, 32)
    x0 = demo_data.to_model_range(clips)
    starts = []
    monkeypatch.setattr(pipe.dit, "forward", lambda z, t, *a, **k: (starts.append(float(t[0])), torch.zeros_like(z))[1])
    still = []
    monkeypatch.setattr(judge, "judge", lambda v, caption: still.append(v) or {"shape_pred": None, "ok": False})
    _, start, t = ev.run_denoise(pipe, cfg, level, specs, clips)
    # the first step at or below the level, then the rest
    assert t == pytest.approx(starts[0] / 1000) and t <= level and len(starts) == 5 - start
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.seed))
    assert np.array_equal(np.stack(still), np.stack([to_uint8(v) for v in (1 - t) * x0 + t * eps]))
    monkeypatch.undo()

    def oracle(z, t, *a, **k):  # rectified flow: v = (x0 - x_t) / t for the [cond; null] batch
        return (torch.cat([x0, x0]) - z) / (t / 1000)[:, None, None, None, None]

    monkeypatch.setattr(pipe.dit, "forward", oracle)
    items, _, _ = ev.run_denoise(pipe, cfg, level, specs, clips)
    score = ev.score_denoise(items, specs)
    assert score["shape"] == 1.0 and score["colour_motion"] == 1.0
    assert sum(n for _, n in score["per_shape"].values()) == 6
