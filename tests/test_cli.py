"""The command line: any text as a prompt (--prompt), prompt= overrides that Hydra would reject or
rewrite refused with the way out, and clean ends under SIGINT/SIGTERM (runner/cli.py)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from runner.cli import hydra_overrides, quote_prompt
from runner.config import UserError
from tests.helpers import make_cfg, subprocess_env

FAST = ("model=demo-random", "sampler.num_steps=2", "progress=false", "num_frames=2", "height=8", "width=8")


@pytest.mark.parametrize("text", [
    "a red circle, moving (fast)!", "it's; [odd] {x} = y", "${oc.env:HOME} red circle", "\\${x}", "back\\slash\\",
    "\\'", "emoji 🎉 \"quoted\"", "  spaced  ", "tab\there",
])
def test_quoted_prompt_reaches_the_config_verbatim(text):
    assert make_cfg(quote_prompt(text)).prompt == text


def test_quoted_prompt_fuzz():
    rng = random.Random(0)
    alphabet = list("ab '\\${}(),=\":;!#%[]*&|~@?<>^`\t") + ["é", "🎉", "\\$", "${", "\\'"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))) for _ in range(200)]
    # Every text through Hydra's override parser and OmegaConf's resolution (the two layers that
    # quote_prompt escapes for); a full compose costs about 0.15 s, so a sample of them takes that path too.
    parser = OverridesParser.create()
    for text in texts:
        value = parser.parse_override(quote_prompt(text)).value()
        assert OmegaConf.to_container(OmegaConf.create({"prompt": value}), resolve=True)["prompt"] == text, repr(text)
    for text in texts[:25]:
        assert make_cfg(quote_prompt(text)).prompt == text, repr(text)


def test_prompt_flag_forms():
    assert hydra_overrides(["--prompt", "a, b", "seed=1"]) == [quote_prompt("a, b"), "seed=1"]
    assert hydra_overrides(["--prompt=a (b)"]) == [quote_prompt("a (b)")]
    assert hydra_overrides(["prompt=a red circle", "-m", "seed=1,2"]) == ["prompt=a red circle", "-m", "seed=1,2"]
    with pytest.raises(UserError, match="--prompt needs the text"):
        hydra_overrides(["seed=1", "--prompt"])


@pytest.mark.parametrize("arg,match", [
    ("prompt=a red circle, moving (fast)", "not valid in Hydra's override grammar"),
    ("prompt=it's red", "not valid in Hydra's override grammar"),
    ("prompt=a red circle, moving left", "is a list of prompts to sweep over"),
    ("prompt=${oc.env:HOME} red circle", r"contains \$\{...\}, which Hydra would replace"),
])
def test_prompt_overrides_hydra_would_reject_or_rewrite_are_refused(arg, match):
    with pytest.raises(UserError, match=match) as e:
        hydra_overrides([arg])
    assert '--prompt "..."' in str(e.value)


def test_cli_prompt_verbatim_and_refusal(tmp_path):
    text = "it's a red circle, moving (left)! ${oc.env:HOME}"
    r = subprocess.run([sys.executable, "-m", "runner.generate", "--prompt", text, f"output_dir={tmp_path / 'o'}", *FAST],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (report,) = [f for f in os.listdir(tmp_path / "o") if f.endswith(".json")]
    assert json.loads((tmp_path / "o" / report).read_text())["prompt"] == text
    bad = subprocess.run([sys.executable, "-m", "runner.generate", "prompt=a, b", f"output_dir={tmp_path / 'b'}"],
                         cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: 'prompt=a, b' is a list of prompts"), bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "b").exists()


# A generation whose video writer stops once ffmpeg has written the temporary file, before the
# rename, and says so in MARKER: the signal then arrives in the middle of the write.
_SLOW_WRITE = """
import os, sys, time
import runner.video as video
real = video.imageio.get_writer
class Slow:
    def __init__(self, w): self.w = w
    def __enter__(self): self.w.__enter__(); return self
    def __exit__(self, *exc):
        self.w.__exit__(*exc)
        open(os.environ["MARKER"], "w").close()
        time.sleep(300)
    def append_data(self, frame): self.w.append_data(frame)
video.imageio.get_writer = lambda *a, **k: Slow(real(*a, **k))
import runner.generate
sys.argv = ["skipsync", *sys.argv[1:]]
runner.generate.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_write_exits_cleanly(tmp_path, sig):
    marker, out = tmp_path / "writing", tmp_path / "out"
    env = {**subprocess_env(), "MARKER": str(marker)}
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, "prompt=a red circle", f"output_dir={out}", *FAST],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), p.communicate(timeout=10)
    assert [f for f in os.listdir(out) if ".partial" in f]  # the write is under way
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"stopped: {signal.Signals(sig).name} received"), err
    assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("stopped")]) == 1, err
    assert not out.exists()  # no partial file, and the directory this run created is gone


@pytest.mark.parametrize("given,expect", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"), ("", "")])
def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(given, expect):
    """runner sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp (runner/__init__.py); a value
    in the environment, even empty, is kept. The ranks of a launch inherit it."""
    env = subprocess_env()
    env.pop("OMP_WAIT_POLICY", None)
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, runner; print(repr(os.environ['OMP_WAIT_POLICY']), 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == f"{expect!r} False"  # set before anything loads torch
