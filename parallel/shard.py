"""Row-band sharding of a latent video for sequence parallelism (pure geometry + slice/assemble).

The latent (B, C, T, H, W) is split over the p ranks of an sp group by latent rows, in whole patch
rows: the Hp = ceil(H / ph) patch rows are divided with `split_sizes(Hp, p)` (the first Hp % p ranks
get one more), and rank r holds the latent rows of its patch rows. Only the last band can end in a
partial patch row (H % ph != 0); the model pads and crops that band itself. The model runs on its
band with `rows=(start_patch_row, Hp)`, so position embeddings use global coordinates, and its
tokens are (B, T, rows_r * Wp, C): S is sharded by whole patch rows.

Nothing here communicates except `assemble`, which all-gathers the bands once (uneven sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.comm import Comm, split_range, split_sizes


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RowShard:
    """Where rank `rank` of `parts` sits in a latent of `frames` x `height` x `width` (latent units).

    patch: the model's (pt, ph, pw). All sizes below are derived; nothing is stored twice.
    """

    frames: int
    height: int
    width: int
    patch: tuple[int, int, int]
    parts: int
    rank: int

    def __post_init__(self):
        if self.parts < 1 or not 0 <= self.rank < self.parts:
            raise ValueError(f"rank {self.rank} outside 0..{self.parts - 1}")
        if self.patch_rows < self.parts:
            raise ValueError(
                f"the latent has {self.height} rows = {self.patch_rows} patch rows of {self.patch[1]}, fewer "
                f"than the {self.parts} sequence-parallel ranks; use parallel.sp <= {self.patch_rows} or a taller video")

    # ---- the token grid
    @property
    def frame_tokens(self) -> int:
        """Tp: token frames (the model pads T up to a multiple of pt)."""
        return ceil_div(self.frames, self.patch[0])

    @property
    def patch_rows(self) -> int:
        return ceil_div(self.height, self.patch[1])

    @property
    def patch_cols(self) -> int:
        return ceil_div(self.width, self.patch[2])

    # ---- this rank's band
    @property
    def row_sizes(self) -> list[int]:
        """Patch rows of every rank."""
        return split_sizes(self.patch_rows, self.parts)

    @property
    def rows(self) -> tuple[int, int]:
        """(start patch row, total patch rows): the model's `rows=` argument."""
        return split_range(self.patch_rows, self.parts, self.rank)[0], self.patch_rows

    def latent_range(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) latent rows of `rank` (default: this rank)."""
        r0, r1 = split_range(self.patch_rows, self.parts, self.rank if rank is None else rank)
        ph = self.patch[1]
        return min(r0 * ph, self.height), min(r1 * ph, self.height)

    @property
    def latent_row_sizes(self) -> list[int]:
        return [b - a for a, b in (self.latent_range(r) for r in range(self.parts))]

    @property
    def token_sizes(self) -> list[int]:
        """S (tokens per frame) held by every rank: whole patch rows times the patch columns."""
        return [n * self.patch_cols for n in self.row_sizes]

    @property
    def frame_sizes(self) -> list[int]:
        """Token frames every rank holds while time-sharded (DSP's spatial attention)."""
        return split_sizes(self.frame_tokens, self.parts)

    # ---- data
    def slice(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's band of the full latent (..., H, W): a view, no communication."""
        a, b = self.latent_range()
        return z[..., a:b, :]

    def assemble(self, band: torch.Tensor, comm: Comm, group: str = "sp") -> torch.Tensor:
        """The full latent from every rank's band: one all_gather along H with uneven sizes."""
        return comm.all_gather(band.contiguous(), group, dim=-2, sizes=self.latent_row_sizes, tag="assemble")


def row_shard(latent_shape, patch, parts: int, rank: int) -> RowShard:
    """RowShard of a latent shaped (..., T, H, W) (a leading batch/channel dims are ignored)."""
    t, h, w = latent_shape[-3:]
    return RowShard(int(t), int(h), int(w), tuple(patch), parts, rank)
