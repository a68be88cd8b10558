"""Shared test helpers: compose the real Hydra config with overrides."""

import os

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner.config import Config, register_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        dcfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def output_stem(out_dir, index: int = 0) -> str:
    """The stem (path without .mp4) of the one video of prompt `index` in out_dir (names carry the
    seed and a settings key, runner/outputs.py)."""
    found = [f[:-4] for f in os.listdir(out_dir) if f.endswith(".mp4") and f.startswith(f"{index:04d}-")]
    assert len(found) == 1, f"expected one video of prompt {index} in {out_dir}, found {found}"
    return os.path.join(str(out_dir), found[0])
