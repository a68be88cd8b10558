"""Install a finished `runner.demo.train` run as the shipped demo model (assets/demo).

    python -m runner.demo.train                   # trains into runs/train_demo
    python -m runner.demo.ship runs/train_demo    # then, once it has finished: -> assets/demo

Training never writes into the shipped directory (an interrupted run would leave a half-trained
model there, and `builtin:demo` would silently generate noise from it). Shipping is this separate,
explicit step: it refuses a run that has not reached its configured steps, checks that the copy
loads, and only then swaps it in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

from models.loading import CheckpointError
from runner.config import UserError
from runner.families import BUILTIN
from runner.families.demo import _load_demo_dir

SHIPPED = BUILTIN["demo"]
DEFAULT_RUN = "runs/train_demo"
FILES = ("config.json", "dit.safetensors", "text_encoder.safetensors")


def overlaps(path: str, other: str) -> bool:
    """Whether `path` is `other`, inside it, or contains it, after resolving symlinks and `..`:
    writing or replacing any of these changes `other`."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output_dir(path: str, shipped: str = SHIPPED) -> None:
    """Refuse a training output_dir that would overwrite (or delete, via an ancestor) the shipped model."""
    if overlaps(path, shipped):
        raise UserError(
            f"output_dir={path} is, contains or lies inside the shipped demo model ({shipped}); training "
            f"writes there at its first save, so an interrupted run would leave a half-trained model in "
            f"its place. Train into another directory (the default is {DEFAULT_RUN}), then install the "
            f"finished run with: python -m runner.demo.ship {DEFAULT_RUN}"
        )


def check_complete(path: str) -> dict:
    """The run's training record, if `path` holds a demo checkpoint whose training reached its
    configured steps; UserError otherwise."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UserError(f"{path} is not a demo checkpoint: it lacks {', '.join(missing)}.")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        training = json.load(f).get("training") or {}
    step, steps = training.get("step"), (training.get("config") or {}).get("steps")
    if not isinstance(step, int) or not isinstance(steps, int):
        raise UserError(f"{path}/config.json has no training record (training.step, training.config.steps): "
                        "only a checkpoint written by runner.demo.train can be shipped.")
    if step < steps:
        raise UserError(
            f"{path} stopped at step {step} of {steps} (interrupted or max_minutes): not shipped. Finish it "
            f"with: python -m runner.demo.train output_dir={path} resume=true (same steps)"
        )
    return training


def _copy_synced(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())  # on disk before the rename that publishes it


def ship(src: str, dest: str = SHIPPED) -> dict:
    """Copy the finished run `src` to `dest`, replacing it. The copy is checked (complete, loads)
    in a temporary sibling of `dest`, so `dest` is either the old or the new checkpoint, never a mix.
    -> the run's training record."""
    if overlaps(src, dest):
        raise UserError(f"{src} and {dest} are the same directory (or one holds the other): nothing to ship.")
    check_complete(src)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.shipping-", dir=parent)
    old = tmp + ".old"
    try:
        for name in FILES:
            _copy_synced(os.path.join(src, name), os.path.join(tmp, name))
        training = check_complete(tmp)  # what is installed is what was checked
        try:
            _load_demo_dir(tmp, torch.device("cpu"), torch.float32)
        except CheckpointError as err:
            raise UserError(f"{src} does not load as a demo model: {err}") from err
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        # Two renames: between them `dest` is briefly absent (a load fails loudly), never partial.
        if os.path.exists(dest):
            os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError:
            if os.path.exists(old):
                os.replace(old, dest)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.demo.ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=DEFAULT_RUN, help=f"a finished runner.demo.train output_dir (default {DEFAULT_RUN})")
    args = parser.parse_args(argv)
    try:
        training = ship(args.run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"shipped {args.run} (step {training['step']}, loss {training.get('ema_loss', float('nan')):.4f}) -> {SHIPPED}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
