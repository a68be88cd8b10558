"""The demo family: STDiT3 in pixel space (the latent is the RGB video in [-1, 1], an identity
autoencoder) with the small built-in text encoder, so it runs on a CPU in seconds.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import torch

from models.loading import CheckpointError, assign_state_dict, load_stdit3, read_safetensors, resolve_checkpoint
from models.stdit3 import STDiT3, STDiT3Config, build_stdit3, get_config
from models.text_tiny import TinyTextConfig, TinyTextEncoder, WordTokenizer
from models.vae import VAEChunk
from runner.config import UserError
from runner.families.base import Conditioning, PipelineBase, quoted, trimmed_conditioning

# The random-weight demo architecture: pixel space (3 channels), small widths.
DEMO_ARCH = STDiT3Config(
    depth=4, hidden_size=128, num_heads=4, patch_size=(1, 4, 4), in_channels=3, pred_sigma=False,
    caption_channels=64, model_max_length=16,
)


class DemoPipeline(PipelineBase):
    family = "demo"

    def __init__(self, dit: STDiT3, text: TinyTextEncoder, tokenizer: WordTokenizer, source: str, random_weights: bool):
        self.dit, self.text, self.tokenizer = dit, text, tokenizer
        self.source, self.random_weights = source, random_weights

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, num_frames, height, width)

    def conditioning_size(self, height: int, width: int) -> tuple[float, float]:
        """The (height, width) the DiT and the timestep transform are conditioned on: exact here."""
        return float(height), float(width)

    def prompt_warnings(self, prompt: str) -> list[str]:
        """One-line warnings about what the demo text encoder silently loses of `prompt`: words past
        its length, words it reads as <unk>, characters it skips; [] for a prompt read in full."""
        tok = self.tokenizer
        kept, dropped = tok.split(prompt)
        out = []
        if dropped:
            out.append(f"the demo text encoder keeps {len(kept)} words; dropped: {quoted(dropped)}")
        unknown = [w for w in dict.fromkeys(kept) if w not in tok.index]
        if unknown:
            out.append(f"words the demo model does not know (read as <unk>): {quoted(unknown)}")
        skipped = tok.skipped(prompt)
        if skipped:
            out.append(f"the demo text encoder reads only the letters a-z; skipped: {quoted(list(dict.fromkeys(skipped)))}")
        if not any(w in tok.index for w in kept):
            out.append("the prompt has no words the demo model knows: the video follows no caption")
        return out

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return trimmed_conditioning(self.text(ids, mask), mask, self.dit.null_caption)

    def chunks(self, num_frames: int) -> list[VAEChunk]:
        """Independent decode units (one per frame: decoding is the identity here)."""
        return [VAEChunk(i, i, i + 1, i, i + 1) for i in range(num_frames)]

    def decode_chunks(self, z: torch.Tensor, num_frames: int, chunk_ids) -> torch.Tensor:
        return z[:, :, list(chunk_ids)]

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Latent (B, C, T, H, W) -> video (B, 3, T, H, W) in [-1, 1]."""
        return z

    def encode_video(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> latent: the identity (the demo model works in pixels)."""
        return x.to(device=self.device, dtype=torch.float32)

    def frame_size(self, z: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the decoded frames of latent z."""
        return int(z.shape[-2]), int(z.shape[-1])

    def describe(self) -> dict:
        return {
            "family": self.family,
            "weights": "random (no checkpoint; outputs are noise-like)" if self.random_weights else self.source,
            "stdit3": self.dit.config.to_dict(),
            "parameters": sum(p.numel() for p in self.dit.parameters()),
        }


def _load_demo_dir(path: str, device, dtype) -> DemoPipeline:
    _, cfg = resolve_checkpoint(path, "dit.safetensors")
    if cfg is None or "stdit3" not in cfg or "text_encoder" not in cfg:
        raise CheckpointError(f"{path!r} is not a demo checkpoint: config.json with 'stdit3' and 'text_encoder' is required.")
    dit = load_stdit3(path, dtype, device, STDiT3Config.from_dict(cfg["stdit3"]), filename="dit.safetensors")
    tok = WordTokenizer(cfg["vocab"], cfg["text_encoder"]["max_length"])
    with torch.device("meta"):
        text = TinyTextEncoder(TinyTextConfig(**cfg["text_encoder"]), len(tok.vocab))
    file, _ = resolve_checkpoint(path, "text_encoder.safetensors")
    assign_state_dict(text, read_safetensors(file, torch.float32, device), "text-encoder checkpoint")
    return DemoPipeline(dit, text.eval(), tok, os.path.abspath(path), random_weights=False)


def save_demo_dir(path: str, pipe: DemoPipeline, extra: dict | None = None) -> None:
    from models.loading import save_checkpoint
    cfg = {
        "family": "demo",
        "stdit3": pipe.dit.config.to_dict(),
        "text_encoder": asdict(pipe.text.config),
        "vocab": pipe.tokenizer.vocab[3:],
        **(extra or {}),
    }
    save_checkpoint(path, pipe.dit.state_dict(), cfg, filename="dit.safetensors")
    save_checkpoint(path, pipe.text.state_dict(), cfg, filename="text_encoder.safetensors")


def random_demo(arch: STDiT3Config, seed: int, device, dtype) -> DemoPipeline:
    torch.manual_seed(seed)
    tok = WordTokenizer(max_length=arch.model_max_length)
    text = TinyTextEncoder(TinyTextConfig(width=arch.caption_channels, max_length=arch.model_max_length), len(tok.vocab))
    dit = build_stdit3(arch, device=device, dtype=dtype, seed=seed)
    return DemoPipeline(dit.eval(), text.to(device).eval(), tok, "random", random_weights=True)


def _named_arch(name: str) -> STDiT3Config:
    try:
        # Pixel space: 3 channels in, velocity only out.
        return get_config(name, in_channels=3, pred_sigma=False)
    except ValueError as e:
        raise UserError(str(e) + " (or STDiT3-demo)") from None
