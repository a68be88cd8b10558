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
