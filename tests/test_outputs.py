"""Outputs never collide and are never mixed up (runner/outputs.py): names unique for the prompt, the
seed and the settings; per-process temporary files; a report that names its video and its hash;
resume that trusts only a matching pair; a failed run leaves nothing new."""

import json
import os
import subprocess
import sys

import pytest

from runner.generate import generate
from runner.outputs import OutputDir, file_sha256, is_complete, temp_path, video_name
from tests.helpers import ROOT, make_cfg, subprocess_env

FAST = ("model=demo-random", "sampler.num_steps=2", "progress=false", "num_frames=2", "height=8", "width=8")


def _pairs(out):
    """{video file: its report} for every video in out; asserts each report names its own video."""
    videos = sorted(f for f in os.listdir(out) if f.endswith(".mp4"))
    pairs = {}
    for v in videos:
        rep = json.loads((out / (v[:-4] + ".json")).read_text())
        assert rep["video"] == {"file": v, "sha256": file_sha256(str(out / v))}
        pairs[v] = rep
    assert not [f for f in os.listdir(out) if f.startswith(".")], os.listdir(out)  # no temporary file left
    return pairs


def test_names_differ_by_prompt_seed_and_settings():
    cfg = make_cfg("prompt=x", *FAST)
    long_a = "a red circle moves left on a dark background while the camera slowly pans to the right"
    long_b = "a red circle moves left on a dark background while the camera slowly pans to the left"
    assert long_a[:60] == long_b[:60]
    names = {
        video_name(0, long_a, 42, cfg), video_name(0, long_b, 42, cfg),  # 60 shared characters
        video_name(0, long_a, 43, cfg),  # another seed
        video_name(0, long_a, 42, make_cfg("prompt=x", *FAST, "sampler.cfg_scale=5.0")),  # another setting
    }
    assert len(names) == 4
    # settings that do not change the pixels keep the name (so resume finds the video)
    same = make_cfg("prompt=y", *FAST, "output_dir=elsewhere", "progress=true", "parallel.sp=2")
    assert video_name(0, long_a, 42, same) == video_name(0, long_a, 42, cfg)
    assert video_name(0, "${oc.env:HOME}, it's (odd)!", 1, cfg).startswith("0000-oc-env-home-it-s-odd-s1-")


def test_temporary_names_are_unique_and_keep_the_extension(tmp_path):
    path = str(tmp_path / "v.mp4")
    names = {temp_path(path) for _ in range(50)}
    assert len(names) == 50
    assert all(os.path.basename(n).startswith(".v.mp4.") and n.endswith(".partial.mp4") for n in names)
    assert all(f".{os.getpid()}-" in n for n in names)


def test_multirun_over_seeds_keeps_every_video(tmp_path):
    # The command from the issue, as a user types it: one prompt, three seeds, one output directory.
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "runner.generate", "-m", "seed=1,2,3", "prompt=a red circle moves left",
                        f"output_dir={out}", *FAST], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pairs = _pairs(out)
    assert sorted(rep["seed"] for rep in pairs.values()) == [1, 2, 3]


def test_prompts_sharing_a_long_prefix_keep_both(tmp_path):
    prefix = "a red circle moves left on a dark background and then it slowly "
    assert len(prefix) >= 60
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{prefix}fades\n{prefix}grows\n")
    generate(make_cfg(f"prompts_file={pf}", f"output_dir={tmp_path / 'o'}", *FAST))
    # and a second run with a single prompt (index 0) of the same prefix
    generate(make_cfg(f"prompt={prefix}spins", f"output_dir={tmp_path / 'o'}", *FAST))
    prompts = sorted(rep["prompt"] for rep in _pairs(tmp_path / "o").values())
    assert prompts == [f"{prefix}fades", f"{prefix}grows", f"{prefix}spins"]


def test_concurrent_runs_into_one_directory(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runner.generate", "prompt=a red circle moves left", f"output_dir={out}", *FAST,
           "num_frames=4", "height=16", "width=16"]
    procs = [subprocess.Popen([*cmd, f"seed={s}"], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (7, 8)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    pairs = _pairs(out)
    assert sorted(rep["seed"] for rep in pairs.values()) == [7, 8]


def test_resume_trusts_only_a_matching_pair(tmp_path):
    cfg = make_cfg("prompt=a cat", f"output_dir={tmp_path}", *FAST)
    (rep,) = generate(cfg)
    stem = rep["output"][:-4]
    assert is_complete(stem, "a cat", 42, cfg)
    assert not is_complete(stem, "a dog", 42, cfg)  # another prompt
    assert not is_complete(stem, "a cat", 43, cfg)  # another seed
    assert not is_complete(stem, "a cat", 42, make_cfg("prompt=a cat", *FAST, "sampler.num_steps=3"))
    assert is_complete(stem, "a cat", 42, make_cfg("prompt=x", *FAST, "parallel.sp=4", "output_dir=y"))
    assert not is_complete(stem, "a cat", 42, make_cfg("prompt=a cat", *FAST, "save_latent=true"))  # no latent
    # a video replaced after its report was written (another run's video) is not complete
    video = rep["output"]
    original = open(video, "rb").read()
    with open(video, "ab") as f:
        f.write(b"\0")
    assert not is_complete(stem, "a cat", 42, cfg)
    with open(video, "wb") as f:
        f.write(original)
    assert is_complete(stem, "a cat", 42, cfg)
    # a report that names another file, or is truncated, is not complete
    report = json.loads(open(stem + ".json").read())
    with open(stem + ".json", "w") as f:
        json.dump({**report, "video": {**report["video"], "file": "other.mp4"}}, f)
    assert not is_complete(stem, "a cat", 42, cfg)
    with open(stem + ".json", "w") as f:
        f.write("{truncated")
    assert not is_complete(stem, "a cat", 42, cfg)
    # the rerun regenerates the video and writes a matching pair again
    (again,) = generate(cfg)
    assert again["output"] == video and is_complete(stem, "a cat", 42, cfg)


def test_failed_write_leaves_nothing(tmp_path):
    out = OutputDir(str(tmp_path / "new"))

    def broken_writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a video")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        out.write_pair("v", broken_writer, {"prompt": "x"})
    assert os.listdir(tmp_path / "new") == []  # the temporary file is gone
    out.discard_if_empty()
    assert not (tmp_path / "new").exists()  # and so is the directory this run created
    existing = OutputDir(str(tmp_path))
    existing.discard_if_empty()
    assert tmp_path.exists()  # a directory that existed before is never removed


def test_failed_run_leaves_no_output_directory(tmp_path):
    # Bad input found before any work, and a failure while loading: neither creates output_dir.
    for overrides in (["sampler.num_steps=0"], [f"model.weights={tmp_path / 'missing'}"]):
        with pytest.raises(ValueError):
            generate(make_cfg("prompt=x", f"output_dir={tmp_path / 'out' / 'sub'}", *FAST, *overrides))
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_runs_from_any_directory(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "skipsync")
    if not os.path.exists(script):
        pytest.skip("the skipsync console script is not installed in this environment")
    r = subprocess.run([script, "prompt=a red circle moves left", f"output_dir={tmp_path / 'o'}", *FAST],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(_pairs(tmp_path / "o")) == 1


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_demo_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile

    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for needed in ("conf/config.yaml", "conf/model/demo.yaml", "conf/cache/adacache.yaml", "conf/preset/720p-4s.yaml",
                   "assets/demo/config.json", "assets/demo/dit.safetensors", "runner/generate.py"):
        assert needed in names, needed
