"""What README.md states about the defaults is what the configuration has, and .gitignore hides no
tracked file."""

import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, make_cfg


def _defaults_row(keys: str) -> list[str]:
    text = open(f"{ROOT}/README.md", encoding="utf-8").read()
    row = re.search(r"^\| " + re.escape(keys) + r" \|[^|]*\| ([^|]*) \|$", text, re.M)
    assert row, f"README.md has no override row for {keys}"
    return [v.strip() for v in row.group(1).split(",")]


def test_override_table_defaults_are_the_default_config():
    cfg = make_cfg()
    assert _defaults_row("`num_frames`, `height`, `width`, `fps`") == [
        str(cfg.num_frames), str(cfg.height), str(cfg.width), str(cfg.fps)]
    assert _defaults_row("`sampler.num_steps`, `sampler.cfg_scale`") == [
        str(cfg.sampler.num_steps), str(cfg.sampler.cfg_scale)]


def test_gitignore_hides_no_tracked_file():
    if shutil.which("git") is None or subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--ignored", "--exclude-standard"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == []
