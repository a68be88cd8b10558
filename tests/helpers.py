"""Shared test helpers: compose the real Hydra config with overrides; data that several test
modules use."""

import os

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner.config import Config, register_configs
from runner.demo.train import DemoArch

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


# reference cache_methods.md section 1: Open-Sora 480p 2 s (51 frames) 9:16, int(bf16(t)) per step
PAB_TABLE = [1000, 992, 984, 976, 968, 960, 952, 940, 932, 920, 908, 892, 880, 864, 848,
             828, 808, 788, 764, 736, 708, 676, 636, 596, 548, 492, 426, 350, 258, 143]

# A demo training run of seconds. Constant lr (the decay depends on the total steps, which a resumed
# run must keep), so a 2-step run can be continued to 4 and compared with a 4-step one.
TINY_TRAIN = dict(
    arch=DemoArch(depth=1, hidden_size=32, patch_size=[1, 2, 2], num_heads=2, text_width=16, text_depth=1, text_heads=2),
    batch_size=2, num_frames=4, size=16, warmup=2, decay_steps=0, progress=False, log_every=1000, t_shift=[3.0],
    t_shift_from=[2],
)
