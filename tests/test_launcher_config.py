"""conf/hydra/launcher/slurm.yaml composes as hydra.launcher (hydra-submitit-launcher is not
installed here, so its `submitit_slurm` node is stood in by a schema with the fields used)."""

import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

@dataclass
class _StandInSlurmQueueConf:
    # Fields named as in hydra_submitit_launcher.config.SlurmQueueConf (plugin 1.2). Structured
    # configs reject unknown keys, so a misspelt key in the YAML fails composition here.
    _target_: str = "stand-in"
    partition: Optional[str] = None
    nodes: int = 1
    gpus_per_node: Optional[int] = None
    tasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    setup: Optional[list] = None
    additional_parameters: dict = field(default_factory=dict)


def test_slurm_launcher_yaml_composes(tmp_path, repo_root):
    conf = tmp_path / "conf"
    shutil.copytree(os.path.join(repo_root, "conf/hydra"), conf / "hydra")
    (conf / "app.yaml").write_text("x: 1\n")
    ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm",
                                 node=_StandInSlurmQueueConf, provider="test")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("app", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert any("SKIPSYNC_RANKS_FROM_SLURM=1" in line for line in launcher.setup)
