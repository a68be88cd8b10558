"""The one counted module every collective goes through (DESIGN principle 5).

`Comm` runs collectives on the mesh's groups, named "sp", "cfg", "agree", "dp" or "world", and
records each into a `CommLog` with the sampling step and phase it ran in. A group of size 1 (or
world size 1) makes every method an identity that records nothing: nothing was communicated, so
"zero collectives on a cached step" can be read from the log rather than claimed.

Byte accounting (per event, this rank, payload only, independent of the algorithm the backend uses;
n = group size, |t| = t.numel() * t.element_size()):

    op              bytes_out (contributed)   bytes_remote (leaves this rank)   bytes_in (arrives)
    all_to_all      |input|                   |input| - |kept chunk|            |output| - |kept chunk|
    all_gather      |input|                   |input| * (n-1)                   |output| - |input|
    all_reduce      |x|                       |x| * (n-1)                       |x| * (n-1)
    broadcast src   |x|                       |x| * (n-1)                       0
    broadcast other 0                         0                                 |x|
    all_gather_obj  pickled size p            p * (n-1)                         sum of others' p
    barrier         0                         0                                 0

"kept chunk" is the part of the all-to-all input that stays on this rank. bytes_remote/bytes_in
count what must logically travel between ranks as if every rank talked to every other directly;
real wire traffic differs by algorithm (a ring all-reduce moves 2(n-1)/n |x| per rank) and,
for uneven all_gather, by the padding (see `Comm.all_gather`). "bytes" in `per_step()` and
`summary()` is bytes_out, the figure DESIGN's layout estimates use (an all-to-all of E/p bytes).
"""

from __future__ import annotations

import math
import pickle
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.mesh import Mesh

# ----------------------------------------------------------------------------- splits


def split_sizes(n: int, p: int) -> list[int]:
    """Balanced uneven split of n items over p ranks: the first n % p ranks get one more."""
    if p < 1 or n < 0:
        raise ValueError(f"split_sizes needs n >= 0 and p >= 1, got n={n}, p={p}")
    q, r = divmod(n, p)
    return [q + (i < r) for i in range(p)]


def split_range(n: int, p: int, r: int) -> tuple[int, int]:
    """[start, stop) of rank r's share under `split_sizes(n, p)`."""
    if not 0 <= r < p:
        raise ValueError(f"rank {r} outside 0..{p - 1}")
    q, extra = divmod(n, p)
    start = r * q + min(r, extra)
    return start, start + q + (r < extra)


# ----------------------------------------------------------------------------- log


@dataclass
class CommEvent:
    op: str
    group: str
    group_size: int
    bytes_out: int
    bytes_remote: int
    bytes_in: int
    step: int | None
    phase: str
    tag: str | None = None


def _zero() -> dict:
    return {"count": 0, "bytes": 0, "bytes_remote": 0, "bytes_in": 0}


def _add(acc: dict, e: CommEvent) -> None:
    acc["count"] += 1
    acc["bytes"] += e.bytes_out
    acc["bytes_remote"] += e.bytes_remote
    acc["bytes_in"] += e.bytes_in


class CommLog:
    """Every collective this rank ran, labelled with the current step and phase."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.events: list[CommEvent] = []
        self.step: int | None = None
        self.phase: str = "main"
        # Steps announced by set_step, so a step with no collectives still shows up (as {}).
        self._steps: dict[int, None] = {}

    def set_step(self, step: int | None) -> None:
        """Label what follows with sampling step `step` (None: outside the sampling loop)."""
        self.step = step
        if step is not None:
            self._steps[step] = None

    @contextmanager
    def in_phase(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield self
        finally:
            self.phase = old

    def record(self, op: str, group: str, group_size: int, bytes_out: int, bytes_remote: int,
               bytes_in: int, tag: str | None = None) -> None:
        self.events.append(CommEvent(op, group, group_size, int(bytes_out), int(bytes_remote),
                                     int(bytes_in), self.step, self.phase, tag))

    def per_step(self) -> dict[int, dict[str, dict]]:
        """{step: {op: {"count", "bytes", "bytes_remote", "bytes_in"}}} over announced steps.

        A step announced with set_step but without collectives maps to {}. Events outside any
        step (step None) are in summary()["outside_steps"].
        """
        out: dict[int, dict[str, dict]] = {s: {} for s in self._steps}
        for e in self.events:
            if e.step is not None:
                _add(out.setdefault(e.step, {}).setdefault(e.op, _zero()), e)
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        total, outside = _zero(), _zero()
        by_op, by_group, by_phase = defaultdict(_zero), defaultdict(_zero), defaultdict(_zero)
        for e in self.events:
            for acc in (total, by_op[e.op], by_group[e.group], by_phase[e.phase]):
                _add(acc, e)
            if e.step is None:
                _add(outside, e)
        steps = self.per_step()
        return {**total, "by_op": dict(by_op), "by_group": dict(by_group),
                "by_phase": dict(by_phase), "outside_steps": outside,
                "steps_without_collectives": [s for s, ops in steps.items() if not ops]}


# ----------------------------------------------------------------------------- collectives

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN, "prod": dist.ReduceOp.PRODUCT}

# all_gather_single replaces the deprecated all_gather_into_tensor in newer torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CollectiveError(RuntimeError):
    """A collective of this module failed: a peer died, was killed or timed out (the first line of
    torch's own error is kept; the original is the __cause__)."""


@contextmanager
def _failing_as_collective(op: str):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - gloo/nccl raise RuntimeError, DistBackendError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CollectiveError(f"{op}: {first}") from e


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Comm:
    """Counted collectives on the mesh's named groups; identity and unrecorded on size-1 groups."""

    def __init__(self, mesh: Mesh, log: CommLog | None = None) -> None:
        self.mesh = mesh
        self.log = log if log is not None else CommLog()

    def size(self, group: str) -> int:
        return self.mesh.group_size(group)

    def rank(self, group: str) -> int:
        return self.mesh.group_rank(group)

    # The two data-moving primitives of all_to_all/all_gather, separate so that a dry run
    # (parallel.dry.DryComm) can count the real shapes without moving data.
    def _all_to_all_single(self, out, send, out_splits, in_splits, pg) -> None:
        with _failing_as_collective("all_to_all"):
            dist.all_to_all_single(out, send, out_splits, in_splits, group=pg)

    def _all_gather_single(self, out, send, pg) -> None:
        with _failing_as_collective("all_gather"):
            _all_gather_single(out, send, group=pg)

    def _pg(self, group: str):
        """The process group, or None when the group has one rank (nothing to do)."""
        if self.mesh.group_size(group) == 1:
            return None
        pg = self.mesh.process_group(group)
        if pg is None:
            raise RuntimeError(f"group {group!r} has {self.mesh.group_size(group)} ranks but no "
                               "process group: build the mesh with init_mesh")
        return pg

    # ------------------------------------------------------------------ all_to_all

    def all_to_all(self, x: torch.Tensor, group: str, scatter_dim: int, gather_dim: int,
                   scatter_sizes: list[int] | None = None, gather_sizes: list[int] | None = None,
                   tag: str | None = None) -> torch.Tensor:
        """Split x along scatter_dim (chunk j to group rank j), concatenate the received chunks
        along gather_dim (in group-rank order).

        scatter_sizes: entries of scatter_dim sent to each rank; the same list on every rank
        (default `split_sizes`, so uneven shapes need no padding). gather_sizes: each rank's
        extent of gather_dim, i.e. what arrives from it (default: all equal to x's). The result
        has scatter_dim = scatter_sizes[me] and gather_dim = sum(gather_sizes). Not autograd-aware.
        """
        pg = self._pg(group)
        if pg is None:
            return x
        n, me = self.size(group), self.rank(group)
        nd = x.dim()
        sd, gd = scatter_dim % nd, gather_dim % nd
        if sd == gd:
            raise ValueError(f"scatter_dim and gather_dim are both {sd}")
        shape = list(x.shape)
        if scatter_sizes is None:
            scatter_sizes = split_sizes(shape[sd], n)
        if gather_sizes is None:
            gather_sizes = [shape[gd]] * n
        if len(scatter_sizes) != n or sum(scatter_sizes) != shape[sd]:
            raise ValueError(f"scatter_sizes {scatter_sizes} must be {n} sizes summing to dim "
                             f"{sd} of shape {tuple(shape)}")
        if len(gather_sizes) != n or gather_sizes[me] != shape[gd]:
            raise ValueError(f"gather_sizes {gather_sizes} must be {n} sizes with entry {me} "
                             f"equal to dim {gd} of shape {tuple(shape)}")

        # Scatter dim first: the chunk for rank j is then one contiguous block. Flat 1-D buffers
        # let blocks of different trailing shapes (uneven gather sizes) share one all_to_all_single.
        send = x.movedim(sd, 0).contiguous()
        other = math.prod(s for k, s in enumerate(shape) if k not in (sd, gd))
        in_splits = [t * shape[gd] * other for t in scatter_sizes]
        out_splits = [scatter_sizes[me] * g * other for g in gather_sizes]
        out = x.new_empty(sum(out_splits))
        self._all_to_all_single(out, send.view(-1), out_splits, in_splits, pg)

        # Block j is [scatter_sizes[me], ...] in the moved layout with gather extent gather_sizes[j].
        moved = [scatter_sizes[me]] + [s for k, s in enumerate(shape) if k != sd]
        gd_moved = gd + 1 if gd < sd else gd
        pieces = []
        for j, block in enumerate(out.split(out_splits)):
            moved[gd_moved] = gather_sizes[j]
            pieces.append(block.view(moved).movedim(0, sd))
        result = torch.cat(pieces, dim=gd)

        kept = in_splits[me] * x.element_size()
        self.log.record("all_to_all", group, n, _nbytes(x), _nbytes(x) - kept,
                        _nbytes(result) - kept, tag)
        return result

    # ------------------------------------------------------------------ all_gather

    def all_gather(self, x: torch.Tensor, group: str, dim: int, sizes: list[int] | None = None,
                   tag: str | None = None) -> torch.Tensor:
        """Concatenate every group rank's x along dim (group-rank order); sizes = each rank's
        extent of dim (default: all equal).

        Uneven sizes: every rank pads its shard to max(sizes) along dim, one all_gather_single
        moves the padded shards, the padding is cut away. With `split_sizes` shards the padding is
        at most one slice per rank; the log counts payload only.
        """
        pg = self._pg(group)
        if pg is None:
            return x
        n, me = self.size(group), self.rank(group)
        d = dim % x.dim()
        local = x.shape[d]
        sizes = [local] * n if sizes is None else list(sizes)
        if len(sizes) != n or sizes[me] != local:
            raise ValueError(f"sizes {sizes} must be {n} sizes with entry {me} equal to dim {d} "
                             f"of shape {tuple(x.shape)}")
        m = max(sizes)
        send = x.movedim(d, 0)
        if local < m:
            padded = send.new_empty((m, *send.shape[1:]))
            padded[:local].copy_(send)
            send = padded
        send = send.contiguous()
        out = send.new_empty((n * m, *send.shape[1:]))
        self._all_gather_single(out, send, pg)
        if d == 0 and all(s == m for s in sizes):
            result = out
        else:
            result = torch.cat([out[j * m:j * m + s].movedim(0, d) for j, s in enumerate(sizes)], dim=d)
        self.log.record("all_gather", group, n, _nbytes(x), _nbytes(x) * (n - 1),
                        _nbytes(result) - _nbytes(x), tag)
        return result

    # ------------------------------------------------------------------ the rest

    def all_reduce(self, x: torch.Tensor, group: str, op: str = "sum",
                   tag: str | None = None) -> torch.Tensor:
        """In-place all-reduce of x (op: sum, avg, max, min, prod); returns x."""
        pg = self._pg(group)
        if op not in _REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(_REDUCE_OPS)}")
        if pg is None:
            return x
        n = self.size(group)
        with _failing_as_collective("all_reduce"):
            dist.all_reduce(x, op=_REDUCE_OPS[op], group=pg)
        self.log.record("all_reduce", group, n, _nbytes(x), _nbytes(x) * (n - 1),
                        _nbytes(x) * (n - 1), tag)
        return x

    def broadcast(self, x: torch.Tensor, group: str, src: int = 0,
                  tag: str | None = None) -> torch.Tensor:
        """In-place broadcast from the group's rank `src` (an index inside the group, not a
        global rank); returns x."""
        pg = self._pg(group)
        if pg is None:
            return x
        n, me = self.size(group), self.rank(group)
        with _failing_as_collective("broadcast"):
            dist.broadcast(x, src=self.mesh.ranks(group)[src], group=pg)
        b = _nbytes(x)
        if me == src:
            self.log.record("broadcast", group, n, b, b * (n - 1), 0, tag)
        else:
            self.log.record("broadcast", group, n, 0, 0, b, tag)
        return x

    def all_gather_object(self, obj, group: str = "world", tag: str | None = None) -> list:
        """Every group rank's picklable obj, in group-rank order (debug: pickles, slow)."""
        pg = self._pg(group)
        if pg is None:
            return [obj]
        n, me = self.size(group), self.rank(group)
        out = [None] * n
        with _failing_as_collective("all_gather_object"):
            dist.all_gather_object(out, obj, group=pg)
        sizes = [len(pickle.dumps(o)) for o in out]
        self.log.record("all_gather_object", group, n, sizes[me], sizes[me] * (n - 1),
                        sum(sizes) - sizes[me], tag)
        return out

    def barrier(self, group: str = "world", tag: str | None = None) -> None:
        pg = self._pg(group)
        if pg is None:
            return
        with _failing_as_collective("barrier"):
            dist.barrier(group=pg)
        self.log.record("barrier", group, self.size(group), 0, 0, 0, tag)
