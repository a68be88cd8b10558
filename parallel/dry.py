"""Dry runs: count the collectives of one rank of a mesh in a single process, moving no data.

`DryComm` is `Comm` with the same shapes, splits and byte accounting, but its all_to_all and
all_gather leave the received parts of their output uninitialised. On meta tensors (a model built
on the meta device) that costs neither memory nor compute, so the collectives of STDiT3-XL/2 at
720p can be counted on a laptop (`bench/comm_bytes.py`); on real tensors the results are garbage
but the log is exact, which tests use to check the formulas for any rank of any p.
"""

from __future__ import annotations

from parallel.comm import Comm, CommLog
from parallel.mesh import Mesh

_DRY = object()  # stands in for a process group


class DryComm(Comm):
    def __init__(self, mesh: Mesh, log: CommLog | None = None) -> None:
        super().__init__(mesh, log)

    def _pg(self, group: str):
        return None if self.mesh.group_size(group) == 1 else _DRY

    def _all_to_all_single(self, out, send, out_splits, in_splits, pg) -> None:
        pass

    def _all_gather_single(self, out, send, pg) -> None:
        pass


def dry_comm(rank: int, dp: int = 1, cfg: int = 1, sp: int = 1) -> DryComm:
    """A DryComm for global rank `rank` of a dp x cfg x sp mesh (no process group)."""
    return DryComm(Mesh.layout(rank, dp * cfg * sp, dp, cfg, sp))
