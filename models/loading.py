"""Strict checkpoint loading from local files (nothing is ever downloaded).

A checkpoint is a `.safetensors` file or a directory in the Hugging Face layout
(`config.json` + `model.safetensors`). Models are built on the meta device and the loaded tensors
are assigned to them, so no second copy of the weights is made.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _preview(keys: list[str], n: int = 5) -> str:
    head = ", ".join(keys[:n])
    return f"{head}{', ...' if len(keys) > n else ''} ({len(keys)} in all)"


def resolve_checkpoint(path: str, filename: str = "model.safetensors") -> tuple[str, dict | None]:
    """-> (safetensors file, config dict or None) for a file or an HF-layout directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; give a local .safetensors file or a directory with {filename}.")
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            found = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
            raise CheckpointError(f"checkpoint directory {path!r} has no {filename} (found: {found}).")
        cfg_file = os.path.join(path, "config.json")
        config = None
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read {cfg_file!r}: {e}") from None
        return file, config
    return path, None


def read_safetensors(file: str, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Read tensors one by one, converting each to `dtype` as it arrives (peak: the converted size)."""
    out = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except Exception as e:  # safetensors raises its own types for corrupt or truncated files
        raise CheckpointError(f"cannot read checkpoint {file!r}: {e}") from None
    return out


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes (checkpoint != model): {_preview(shapes, 3)}")
    if problems:
        raise CheckpointError(
            f"the {what} does not fit the model: " + "; ".join(problems)
            + ". Check that the checkpoint and the model configuration are the same architecture."
        )
    # A NaN or Inf weight makes every output NaN, found only after the last step otherwise.
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"the {what} has NaN or Inf values in {_preview(bad)}; the file is damaged or came "
                              "from a diverged training run.")


def assign_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Validate strictly, then assign the tensors to a (meta-built) model."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def check_materialized(model: nn.Module, what: str = "checkpoint") -> None:
    """After loading into a meta-built model: fail if a tensor is still on the meta device (a
    non-persistent buffer nobody rebuilt), instead of failing later inside a forward."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"after loading the {what}, tensors are still unallocated (meta): {_preview(left)}")


def save_checkpoint(directory: str, state: dict[str, torch.Tensor], config: dict, filename="model.safetensors"):
    """Write an HF-layout directory: config.json + safetensors (contiguous CPU tensors)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(directory, filename))
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_stdit3(path: str, dtype: torch.dtype = torch.float32, device="cpu", config=None, filename="model.safetensors"):
    """STDiT3 from a local checkpoint; the architecture comes from config.json unless `config` is given."""
    from models.layers import PositionEmbedding2D
    from models.stdit3 import STDiT3Config, build_stdit3

    file, cfg_dict = resolve_checkpoint(path, filename)
    if config is None:
        if cfg_dict is None:
            raise CheckpointError(
                f"checkpoint {path!r} has no config.json next to it; pass the architecture explicitly (model.arch)."
            )
        config = STDiT3Config.from_dict(cfg_dict)
    model = build_stdit3(config, device="meta", dtype=dtype)
    assign_state_dict(model, read_safetensors(file, dtype, device), "STDiT3 checkpoint")
    # Non-persistent buffers are not in the file: rebuild them on the real device.
    model.pos_embed = PositionEmbedding2D(config.hidden_size).to(device)
    check_materialized(model, "STDiT3 checkpoint")
    return model.eval()
