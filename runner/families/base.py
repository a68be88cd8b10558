"""What every model family shares: the conditioning it hands the sampler and the pipeline base."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.stdit3 import STDiT3


@dataclass
class Conditioning:
    y: torch.Tensor  # (2B, L, Cc): [cond; null]
    mask: torch.Tensor  # (B, L) long: the cond mask, reused for the null half as Open-Sora does

    def select(self, i: int) -> "Conditioning":
        """Prompt i alone, trimmed to its own tokens (a batch is trimmed to its longest prompt)."""
        b = self.mask.shape[0]
        mask = self.mask[i:i + 1]
        n = int(mask.sum(1).max())
        return Conditioning(self.y[[i, b + i], :n], mask[:, :n])

    def to(self, device) -> "Conditioning":
        return Conditioning(self.y.to(device), self.mask.to(device))


def trimmed_conditioning(y: torch.Tensor, mask: torch.Tensor, null: torch.Tensor) -> Conditioning:
    """[cond; null] from text embeddings y (B, L, Cc), their mask (B, L) and the model's null
    caption (>= L, Cc). Padding keys are masked out (the null half reuses the cond mask, as Open-Sora
    does), so dropping the all-padding tail changes nothing and saves cross-attention work."""
    n = int(mask.sum(1).max())
    null = null[:n].to(device=y.device, dtype=y.dtype)[None].expand(y.shape[0], -1, -1)
    return Conditioning(torch.cat([y[:, :n], null], 0), mask[:, :n])


def quoted(items: list[str], limit: int = 10) -> str:
    """'a', 'b', ... for a warning line: at most `limit` items, then how many more."""
    text = ", ".join(repr(x) for x in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


class PipelineBase:
    """What every family shares around its STDiT3 (`self.dit`)."""

    dit: STDiT3

    @property
    def device(self) -> torch.device:
        return self.dit.x_embedder.proj.weight.device

    @property
    def latent_channels(self) -> int:
        return self.dit.config.in_channels
