import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from models.loading import CheckpointError
from runner.config import UserError
from runner.generate import generate
from runner.families.demo import random_demo, save_demo_dir, DEMO_ARCH
from runner.video import read_video
from runner.outputs import file_sha256, video_name
from tests.helpers import ROOT, make_cfg, output_stem, subprocess_env

FAST = ("model=demo-random", "sampler.num_steps=3", "progress=false")


def test_end_to_end_writes_video_and_report(tmp_path):
    cfg = make_cfg("prompt=a red circle moves left", f"output_dir={tmp_path}", "num_frames=5", "height=24",
                   "width=40", *FAST)
    (rep,) = generate(cfg)
    frames = read_video(rep["output"])
    assert frames.shape == (5, 24, 40, 3)
    report = json.loads(open(rep["output"][:-4] + ".json").read())
    assert report["frames"] == {"count": 5, "height": 24, "width": 40, "fps": 24}
    assert len(report["step_times_s"]) == 3
    assert report["model"]["weights"].startswith("random")
    assert report["config"]["sampler"]["num_steps"] == 3
    for key in ("code_version", "device", "dtype", "memory", "timings"):
        assert key in report
    # the name holds the index, a slug, the seed and the settings key; the report names the video and its hash
    stem = video_name(0, "a red circle moves left", 42, cfg)
    assert stem.startswith("0000-a-red-circle-moves-left-s42-")
    assert sorted(os.listdir(tmp_path)) == [stem + ".json", stem + ".mp4"]
    assert report["video"] == {"file": stem + ".mp4", "sha256": file_sha256(str(tmp_path / (stem + ".mp4")))}


def test_odd_size_video_keeps_exact_size(tmp_path):
    (rep,) = generate(make_cfg("prompt=x", f"output_dir={tmp_path}", "num_frames=3", "height=9", "width=13", *FAST))
    assert read_video(rep["output"]).shape == (3, 9, 13, 3)


def test_same_seed_is_bit_identical_and_prompts_file(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a blue square moves up\n\n# a comment\na blue square moves up\n")
    cfg = make_cfg(f"prompts_file={pf}", f"output_dir={tmp_path / 'a'}", "save_latent=true", *FAST)
    r = generate(cfg)
    cfg2 = make_cfg(f"prompts_file={pf}", f"output_dir={tmp_path / 'b'}", "save_latent=true", *FAST)
    r2 = generate(cfg2)
    assert [x["seed"] for x in r] == [42, 43]  # seed of prompt i = seed + i
    lat = lambda rep: torch.load(rep["output"][:-4] + ".latent.pt")  # noqa: E731
    assert torch.equal(lat(r[0]), lat(r2[0])) and torch.equal(lat(r[1]), lat(r2[1]))
    assert not torch.equal(lat(r[0]), lat(r[1]))  # same prompt, different seed


def _assert_no_files(d):
    assert not os.path.exists(d), f"a failed run left {d} behind"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["prompt=' '"], "prompt is empty"),
        (["num_frames=0", "prompt=x"], "num_frames must be >= 1"),
        (["sampler.num_steps=-2", "prompt=x"], "num_steps must be >= 1"),
        (["height=0", "prompt=x"], "height and width"),
        (["model.dtype=float8", "prompt=x"], "model.dtype=float8 is not known"),
    ],
)
def test_bad_values(tmp_path, overrides, match):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        generate(make_cfg(*FAST, *overrides, f"output_dir={out}"))
    _assert_no_files(out)


def test_bad_prompts_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(UserError, match="has no prompts"):
        generate(make_cfg(f"prompts_file={empty}", f"output_dir={tmp_path / 'o'}", *FAST))
    with pytest.raises(UserError, match="cannot read prompts_file"):
        generate(make_cfg(f"prompts_file={tmp_path / 'missing.txt'}", f"output_dir={tmp_path / 'o'}", *FAST))
    _assert_no_files(tmp_path / "o")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to output_dir"):
        generate(make_cfg("prompt=x", f"output_dir={blocker / 'sub'}", *FAST))


def test_missing_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        generate(make_cfg("prompt=x", f"model.weights={tmp_path / 'none'}", f"output_dir={tmp_path / 'o'}", *FAST))
    pipe = random_demo(DEMO_ARCH, 0, "cpu", torch.float32)
    ck = tmp_path / "ck"
    save_demo_dir(str(ck), pipe)
    state = dict(pipe.dit.state_dict())
    state.pop("final_layer.linear.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, str(ck / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: final_layer.linear.bias"):
        generate(make_cfg("prompt=x", f"model.weights={ck}", f"output_dir={tmp_path / 'o'}", *FAST))
    _assert_no_files(tmp_path / "o")


def test_saved_demo_checkpoint_reproduces_random_model(tmp_path):
    ck = tmp_path / "ck"
    save_demo_dir(str(ck), random_demo(DEMO_ARCH, 0, "cpu", torch.float32))
    a = generate(make_cfg("prompt=x", f"model.weights={ck}", f"output_dir={tmp_path / 'a'}", "save_latent=true", *FAST))
    b = generate(make_cfg("prompt=x", f"output_dir={tmp_path / 'b'}", "save_latent=true", *FAST))
    assert torch.equal(torch.load(a[0]["output"][:-4] + ".latent.pt"), torch.load(b[0]["output"][:-4] + ".latent.pt"))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runner.generate", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_success_and_errors(tmp_path):
    ok = _cli("prompt=a green triangle moves down", f"output_dir={tmp_path / 'ok'}", *FAST, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert output_stem(tmp_path / "ok").startswith(str(tmp_path / "ok" / "0000-a-green-triangle-moves-down-s42-"))
    bad = _cli("prompt=", f"output_dir={tmp_path / 'bad'}", cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("error: the prompt is empty") == 1
    assert "Traceback" not in bad.stderr
    unknown = _cli("model=nosuchmodel", "prompt=x", cwd=ROOT)
    assert unknown.returncode != 0 and "Could not find 'model/nosuchmodel'" in unknown.stderr
    typo = _cli("prompt=x", "num_frame=3", cwd=ROOT)
    assert typo.returncode != 0 and "num_frame" in typo.stderr
    _assert_no_files(tmp_path / "bad")


def test_prompt_warnings_are_printed_and_reported(tmp_path, capsys):
    (rep,) = generate(make_cfg("prompt=a zebra moves left", f"output_dir={tmp_path}", *FAST))
    assert any("'zebra'" in w for w in rep["prompt_warnings"])
    assert json.loads(open(rep["output"][:-4] + ".json").read())["prompt_warnings"] == rep["prompt_warnings"]
    assert "warning: prompt 0: " in capsys.readouterr().err
    (ok,) = generate(make_cfg("prompt=a red circle moves left", f"output_dir={tmp_path}", *FAST))
    assert ok["prompt_warnings"] == []
