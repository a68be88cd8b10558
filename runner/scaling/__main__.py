"""Scaling studies (also the `skipsync-scaling` console script):

    python -m runner.scaling [OVERRIDES]      # run a sweep (a Hydra app over conf/scaling.yaml)
    python -m runner.scaling report DIR       # its table (CSV, JSON, Markdown) and plots
    python -m runner.scaling predict [...]    # the cost model beyond what can be measured here
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from runner.config import CONF_DIR, UserError
from runner.scaling import sweep

sweep.register()


# Its own directory: in conf/ itself, model=NAME would select the generator's model group.
@hydra.main(version_base=None, config_path=os.path.join(CONF_DIR, "scaling"), config_name="scaling")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        recs = sweep.Sweep(OmegaConf.to_object(dcfg)).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    failed = [r["id"] for r in recs if r["status"] != "ok"]
    print(f"scaling: {len(recs) - len(failed)} of {len(recs)} point(s) run now are ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "")
          + f". Table and plots: python -m runner.scaling report {dcfg.dir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        from runner.scaling import table

        sys.exit(table.main(argv[1:]))
    if argv and argv[0] == "predict":
        from runner.scaling import predict

        sys.exit(predict.main(argv[1:]))
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
