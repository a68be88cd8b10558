"""Training never writes the shipped demo model; runner.demo.ship installs only a finished run."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from runner.config import UserError
from runner.families import BUILTIN
from runner.demo import train as train_demo
from runner.demo.ship import check_complete, overlaps, ship
from runner.demo.train import TrainConfig, train
from tests.helpers import TINY_TRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = BUILTIN["demo"]


def _hashes(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def test_default_output_dir_is_not_the_shipped_model(monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented command runs from the repository root
    out = TrainConfig().output_dir
    assert not overlaps(out, SHIPPED)
    assert os.path.realpath(out) == os.path.join(os.path.realpath(ROOT), "runs", "train_demo")


@pytest.fixture
def assets_untouched():
    before = _hashes(SHIPPED), sorted(os.listdir(os.path.dirname(SHIPPED)))
    yield
    assert (_hashes(SHIPPED), sorted(os.listdir(os.path.dirname(SHIPPED)))) == before


def test_training_into_the_shipped_model_is_refused(tmp_path, monkeypatch, assets_untouched):
    monkeypatch.chdir(ROOT)
    # Without the refusal the first save would replace assets/demo: fail before it can.
    monkeypatch.setattr(train_demo, "save", lambda *a, **k: pytest.fail("train() went on to save"))
    (tmp_path / "link").symlink_to(SHIPPED)
    (tmp_path / "assets_link").symlink_to(os.path.dirname(SHIPPED))
    ways = [SHIPPED, "assets/demo", "assets/demo/", "./runs/../assets/demo", str(tmp_path / "link"),
            str(tmp_path / "assets_link" / "demo"),
            "assets",  # an ancestor: the save's rename would replace the whole folder
            "assets/demo/run"]  # inside it
    for out in ways:
        with pytest.raises(UserError, match="shipped demo model"):
            train(TrainConfig(steps=1, output_dir=out, **TINY_TRAIN))
    assert not overlaps(str(tmp_path / "run"), SHIPPED) and not overlaps("assets/demo2", SHIPPED)


def test_cli_refusal_is_an_error_line_and_exit_2(assets_untouched):
    res = subprocess.run([sys.executable, "-m", "runner.demo.train", "output_dir=assets/demo", "steps=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: output_dir=assets/demo is") and "runner.demo.ship" in res.stderr
    assert "Traceback" not in res.stderr


def test_ship_refuses_an_unfinished_run_and_installs_a_finished_one(tmp_path):
    run = str(tmp_path / "run")
    target = tmp_path / "assets" / "demo"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from the previous model")
    before = _hashes(target)
    # max_minutes stops (and saves) after the first step: a checkpoint at step 1 of 3
    train(TrainConfig(steps=3, output_dir=run, save_every=100, max_minutes=1e-9, **TINY_TRAIN))
    with pytest.raises(UserError, match="stopped at step 1 of 3"):
        ship(run, str(target))
    assert _hashes(target) == before and os.listdir(tmp_path / "assets") == ["demo"]

    train(TrainConfig(steps=3, output_dir=run, save_every=100, resume=True, **TINY_TRAIN))
    training = ship(run, str(target))
    assert training["step"] == 3 == training["config"]["steps"]
    assert _hashes(target) == _hashes(run)  # exactly the run's files: the stale one is gone
    assert os.listdir(tmp_path / "assets") == ["demo"]  # no temporary or .old folder left behind
    from runner.families.demo import _load_demo_dir

    assert not _load_demo_dir(str(target), torch.device("cpu"), torch.float32).random_weights

    with pytest.raises(UserError, match="same directory"):
        ship(str(target), str(target))


def test_ship_refuses_a_checkpoint_without_a_training_record(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("dit.safetensors", "text_encoder.safetensors"):
        (src / f).write_bytes(b"")
    (src / "config.json").write_text(json.dumps({"family": "demo"}))
    with pytest.raises(UserError, match="no training record"):
        ship(str(src), str(tmp_path / "dest"))
    (src / "config.json").unlink()
    with pytest.raises(UserError, match="lacks config.json"):
        ship(str(src), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


def test_the_shipped_model_is_a_finished_run():
    # what runner.demo.ship requires of a run holds for the model shipped today
    training = check_complete(SHIPPED)
    assert training["step"] == training["config"]["steps"] == TrainConfig().steps
