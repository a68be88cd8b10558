"""The runner on dp x cfg x sp gloo ranks against one process: final latents, written videos,
collectives per step from the run report, the prompt split across dp groups, and resume.

A tiny STDiT3 in fp32 on a 5-frame 9x10 video: 5 latent frames and 5 patch rows (the last one
half), which divide by none of p = 2, 3, 4.
"""

import json
import os

import numpy as np
import pytest
import torch

from dist_util import run_dist
from parallel.comm import split_sizes
from parallel.shard import row_shard
from runner.generate import generate
from runner.video import read_video
from tests.helpers import make_cfg, output_stem

PROMPTS = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]
BASE = ("model=demo-random", "model.arch=STDiT3-tiny", "num_frames=5", "height=9", "width=10", "sampler.num_steps=2",
        "progress=false", "save_latent=true", "device=cpu")
DEPTH, C, B = 2, 64, 2  # STDiT3-tiny: layer pairs, hidden size; the CFG batch
T, ROWS, COLS = 5, 5, 5  # token frames, patch rows, patch columns


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, all three prompts: {name: (latent, frames)}."""
    out = tmp_path_factory.mktemp("ref")
    pf = out / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    reps = generate(make_cfg(*BASE, f"prompts_file={pf}", f"output_dir={out}"))
    assert reps[0]["parallel"]["collectives_per_rank"][0]["per_step"] == {"0": {}, "1": {}}
    return {os.path.basename(r["output"])[:-4]: _load(r["output"]) for r in reps}


def _load(mp4):
    return torch.load(mp4[:-4] + ".latent.pt"), read_video(mp4)


def _generate(rank, world, overrides):
    from runner.generate import generate as gen  # noqa: F811 - in the rank process
    from tests.helpers import make_cfg as mk

    return [r["parallel"] for r in gen(mk(*overrides))]


def _run(tmp_path, world, *overrides, prompts=PROMPTS[:1]):
    out = tmp_path / "out"
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    results = run_dist(_generate, world, (*BASE, f"prompts_file={pf}", f"output_dir={out}", *overrides), timeout=90)
    return out, results


def _assert_same_outputs(out, reference, n):
    names = sorted(f[:-4] for f in os.listdir(out) if f.endswith(".mp4"))
    assert names == sorted(reference)[:n]
    for name in names:
        lat, frames = _load(str(out / (name + ".mp4")))
        ref_lat, ref_frames = reference[name]
        assert (lat - ref_lat).abs().max().item() <= 1e-4 * ref_lat.abs().max().item()
        assert np.abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1


def _a2a_bytes(layout, p, r, batch):
    """all_to_all bytes of rank r in one step (one forward), fp32."""
    s_r = split_sizes(ROWS, p)[r] * COLS
    e_r, e = batch * T * s_r * C * 4, batch * T * ROWS * COLS * C * 4
    if layout == "dsp":
        return DEPTH * (e_r + batch * split_sizes(T, p)[r] * ROWS * COLS * C * 4)
    return DEPTH * (4 * e_r + 2 * e // p)


@pytest.mark.slow
@pytest.mark.parametrize("layout,sp", [("dsp", 2), ("dsp", 3), ("dsp", 4), ("ulysses", 2), ("ulysses", 4)])
def test_sequence_parallel_equals_one_process(tmp_path, reference, layout, sp):
    out, results = _run(tmp_path, sp, f"parallel.sp={sp}", f"parallel.layout={layout}")
    _assert_same_outputs(out, reference, 1)
    assert results[1:] == [[]] * (sp - 1)  # only the group leader writes
    (info,) = results[0]
    assert info["layout"] == layout and info["mesh"]["sp"] == sp
    count = DEPTH * (2 if layout == "dsp" else 4)
    for r, rank in enumerate(info["collectives_per_rank"]):
        assert rank["sp_rank"] == r and sorted(rank["per_step"]) == ["0", "1"]
        for ops in rank["per_step"].values():  # exactly the layout's all-to-alls, nothing else
            assert ops.keys() == {"all_to_all"}
            assert ops["all_to_all"]["count"] == count
            assert ops["all_to_all"]["bytes"] == _a2a_bytes(layout, sp, r, B)
        # outside the loop: the one all_gather that assembles the latent
        band = row_shard((5, 9, 10), (1, 2, 2), sp, r).latent_row_sizes[r]
        # the latent's bands gathered once; then each rank decodes its run of frames (one chunk per
        # frame in pixel space) and the frames are gathered once
        frames = split_sizes(T, sp)[r]
        assert rank["outside_steps"]["by_phase"] == {"assemble": {"count": 1, "bytes": 3 * T * band * 10 * 4},
                                                     "decode": {"count": 1, "bytes": 3 * frames * 9 * 10 * 4}}
    rep = json.loads(open(output_stem(out) + ".json").read())
    assert rep["parallel"]["collectives_per_rank"][1]["per_step"]["0"]["all_to_all"]["count"] == count


@pytest.mark.slow
@pytest.mark.parametrize("sp", [1, 2])
def test_cfg_parallel_equals_one_process(tmp_path, reference, sp):
    out, results = _run(tmp_path, 2 * sp, "parallel.cfg=2", f"parallel.sp={sp}")
    _assert_same_outputs(out, reference, 1)
    (info,) = results[0]
    for rank in info["collectives_per_rank"]:
        band_rows = row_shard((5, 9, 10), (1, 2, 2), sp, rank["sp_rank"]).latent_row_sizes[rank["sp_rank"]]
        for ops in rank["per_step"].values():
            # the velocity band (3 channels, one CFG half) is the only exchange in the CFG pair
            assert ops["all_gather"] == {"count": 1, "bytes": 3 * T * band_rows * 10 * 4,
                                         "bytes_remote": 3 * T * band_rows * 10 * 4,
                                         "bytes_in": 3 * T * band_rows * 10 * 4}
            if sp == 1:
                assert ops.keys() == {"all_gather"}
            else:  # each CFG half runs DSP with batch 1
                assert ops["all_to_all"]["count"] == 2 * DEPTH
                assert ops["all_to_all"]["bytes"] == _a2a_bytes("dsp", 2, rank["sp_rank"], 1)


@pytest.mark.slow
def test_data_parallel_splits_prompts_and_resumes(tmp_path, reference):
    out, results = _run(tmp_path, 2, "parallel.dp=2", prompts=PROMPTS)
    _assert_same_outputs(out, reference, 3)
    # round-robin: prompts 0 and 2 on dp group 0 (rank 0), prompt 1 on group 1 (rank 1); no collectives
    assert [len(r) for r in results] == [2, 1]
    for infos in results:
        for info in infos:
            (rank,) = info["collectives_per_rank"]
            assert all(ops == {} for ops in rank["per_step"].values())
    # Resume: a rerun skips complete videos; a missing report means the video is redone.
    os.remove(output_stem(out, 1) + ".json")
    stamp = os.path.getmtime(output_stem(out, 0) + ".mp4")
    _, again = _run(tmp_path, 2, "parallel.dp=2", prompts=PROMPTS)
    assert [len(r) for r in again] == [0, 1]
    assert os.path.getmtime(output_stem(out, 0) + ".mp4") == stamp
    _assert_same_outputs(out, reference, 3)


@pytest.mark.parametrize("overrides,match", [
    (["parallel.sp=2"], r"sp=2 = 2 != world size 1 \(launched without torchrun\? world size is 1\)"),
    (["parallel.layout=ring"], "parallel.layout='ring' is not known; use one of: dsp, ulysses"),
    (["parallel.timeout_s=0"], "parallel.timeout_s must be > 0"),
])
def test_bad_parallel_settings_in_one_process(tmp_path, overrides, match):
    from runner.config import UserError

    with pytest.raises(UserError, match=match):
        generate(make_cfg(*BASE, "prompt=x", f"output_dir={tmp_path / 'o'}", *overrides))
    assert not (tmp_path / "o").exists()


def _expect_user_error(rank, world, overrides):
    from runner.config import UserError
    from runner.generate import generate as gen  # noqa: F811
    from tests.helpers import make_cfg as mk

    try:
        gen(mk(*overrides))
    except UserError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_impossible_splits_fail_on_every_rank_before_any_collective(tmp_path):
    # Ulysses with 4 heads over 3 ranks; 2 patch rows over 3 ranks. Both are found while preparing,
    # before the first collective, so no rank waits for another.
    base = (*BASE, "prompt=x", f"output_dir={tmp_path}", "parallel.sp=3")
    msgs = run_dist(_expect_user_error, 3, (*base, "parallel.layout=ulysses"), timeout=60)
    assert all("4 attention heads over parallel.sp=3" in m for m in msgs), msgs
    msgs = run_dist(_expect_user_error, 3, (*base, "height=4"), timeout=60)
    assert all("2 patch rows of 2, fewer than the 3 sequence-parallel ranks" in m for m in msgs), msgs
