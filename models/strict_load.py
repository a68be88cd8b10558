"""Strict state-dict loading with errors that say what is wrong.

``load_strict`` compares key sets and shapes *before* touching the module, raises
:class:`CheckpointMismatchError` naming the first offending keys, then loads with
``assign=True`` so a module built on the meta device takes the loaded tensors as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the module."""


def _preview(keys, limit=5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if wrong_shape:
        problems.append("shape mismatches: " + "; ".join(wrong_shape[:5]))
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match {type(module).__name__}: " + " | ".join(problems)
        )


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Check, cast floating tensors to ``dtype`` (if given), load with ``assign=True``."""
    check_state_dict(module, state_dict, source)
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointMismatchError(
            f"after loading {source}, tensors are still on the meta device: {_preview(leftover)}"
        )
    return module
