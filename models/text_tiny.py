"""A small text encoder for the embedded demo model: a word-level tokenizer and a few transformer
layers. It plays T5's role at toy scale: (B, L, C) states plus a validity mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from models.layers import initial_value

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"

# Words the default vocabulary knows; anything else maps to <unk>.
DEFAULT_WORDS = (
    "a an the on in of with and is to at moves move moving stays still static left right up down "
    "red green blue yellow white black orange purple cyan magenta pink grey gray "
    "circle square triangle ball box shape "
    "dark light bright plain textured background"
).split()


class WordTokenizer:
    """Lower-cases, splits on non-letters, maps unknown words to <unk>, appends <eos>, pads to max_length."""

    def __init__(self, words: list[str] | tuple[str, ...] = DEFAULT_WORDS, max_length: int = 16):
        self.vocab = [PAD, UNK, EOS] + sorted(set(w.lower() for w in words) - {PAD, UNK, EOS})
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def split(self, text: str) -> tuple[list[str], list[str]]:
        """(kept, dropped): the words that are encoded (max_length - 1 of them: one place is <eos>)
        and those past them, which are not."""
        words = self.words(text)
        return words[: self.max_length - 1], words[self.max_length - 1:]

    def skipped(self, text: str) -> list[str]:
        """What `words` does not read, apart from spaces and ASCII punctuation: runs of digits,
        emoji, accented letters, ..."""
        return re.findall(r"[^a-z\s!-/:-@\[-`{-~]+", text.lower())  # the ranges: ASCII punctuation

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, max_length) long, mask (B, max_length) long (1 = valid token)."""
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            toks = [self.index.get(w, self.index[UNK]) for w in self.split(text)[0]]
            toks.append(self.index[EOS])
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return ids, mask


@dataclass
class TinyTextConfig:
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    max_length: int = 16


class TinyTextEncoder(nn.Module):
    def __init__(self, config: TinyTextConfig, vocab_size: int):
        super().__init__()
        self.config = config
        # nn.Embedding's own init (normal_) would run on meta too; same draw, same order as its default.
        shape = (vocab_size, config.width)
        self.tok_embed = nn.Embedding(*shape, _weight=initial_value(shape, lambda: torch.empty(shape).normal_()))
        shape = (config.max_length, config.width)
        self.pos_embed = nn.Parameter(initial_value(shape, lambda: torch.randn(shape) * 0.02))
        layer = nn.TransformerEncoderLayer(
            config.width, config.num_heads, 4 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(ids) + self.pos_embed[: ids.shape[1]]
        x = self.layers(x, src_key_padding_mask=mask == 0)
        return self.norm(x)
