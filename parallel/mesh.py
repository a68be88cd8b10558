"""Device mesh: dp x cfg x sp ranks and their process groups.

Rank order is sp innermost, then cfg, then dp:

    rank = (dp_rank * cfg + cfg_rank) * sp + sp_rank

so the sp ranks of one group are consecutive (on one node when sp <= GPUs per node: the
all-to-all traffic is the heaviest) and the cfg x sp ranks of one prompt form a contiguous block.

The rank arithmetic is pure functions (`coords_of`, `rank_of`, `group_ranks`, `Mesh.layout`),
testable in one process; `init_mesh` adds the process groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

GROUP_KINDS = ("sp", "cfg", "agree", "dp")


@dataclass
class ParallelConfig:
    """The parallel settings (`parallel.*` of the job's config): the dp x cfg x sp mesh and the
    sequence-parallel layout. dp * cfg * sp must equal the number of processes (torchrun's
    WORLD_SIZE, 1 without torchrun); one of them may be -1 to take what the world size leaves."""

    dp: int = 1  # prompt groups: prompts are dealt round-robin to the dp groups
    cfg: int = 1  # 1, or 2: conditional and unconditional halves on different ranks
    sp: int = 1  # sequence parallelism: ranks sharing one video's tokens
    layout: str = "dsp"  # dsp | ulysses (parallel/layouts.py)
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise; or any torch backend string
    timeout_s: float = 300.0  # any collective (and a silent rank) waited on longer than this fails the job


# --------------------------------------------------------------------------- sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_sizes(world_size: int) -> list[tuple[int, int, int]]:
    """Every (dp, cfg, sp) that fits `world_size` ranks."""
    return [(world_size // (c * s), c, s)
            for c in (1, 2) if world_size % c == 0
            for s in _divisors(world_size // c)]


def resolve_sizes(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp, cfg, sp) with a -1 filled in; ValueError saying what would work otherwise."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    sizes = {"dp": cfg.dp, "cfg": cfg.cfg, "sp": cfg.sp}
    hint = " (launched without torchrun? world size is 1)" if world_size == 1 else ""
    combos = valid_sizes(world_size)
    listed = ", ".join(f"dp={d} cfg={c} sp={s}" for d, c, s in combos[:16])
    if len(combos) > 16:
        listed += ", ..."
    valid_msg = f"valid for world size {world_size}: {listed}"

    bad = {k: v for k, v in sizes.items() if not (v >= 1 or v == -1)}
    if bad:
        raise ValueError(f"parallel sizes must be >= 1 or -1 (fill), got {bad}")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one of dp/cfg/sp may be -1, got {fill}")
    if cfg.cfg not in (1, 2, -1):
        raise ValueError(f"parallel.cfg must be 1 or 2, got {cfg.cfg}")

    if fill:
        axis = fill[0]
        rest = 1
        for k, v in sizes.items():
            if k != axis:
                rest *= v
        if world_size % rest:
            fixed = " x ".join(f"{k}={v}" for k, v in sizes.items() if k != axis)
            raise ValueError(
                f"cannot fill {axis}=-1: {fixed} = {rest} does not divide world size "
                f"{world_size}{hint}; the product of the fixed sizes must be one of "
                f"{_divisors(world_size)}; {valid_msg}")
        sizes[axis] = world_size // rest
        if sizes["cfg"] not in (1, 2):
            raise ValueError(
                f"filling cfg=-1 gives cfg={sizes['cfg']}, but cfg must be 1 or 2; {valid_msg}")
        return sizes["dp"], sizes["cfg"], sizes["sp"]

    product = cfg.dp * cfg.cfg * cfg.sp
    if product != world_size:
        # Suggest fixing each axis in turn, keeping the other two.
        fixes = []
        for axis in ("sp", "dp", "cfg"):
            rest = product // sizes[axis]
            if world_size % rest == 0:
                v = world_size // rest
                if axis != "cfg" or v in (1, 2):
                    fixes.append(f"{axis}={v}")
        fix_msg = f"set {' or '.join(fixes)}, or " if fixes else ""
        raise ValueError(
            f"dp={cfg.dp} x cfg={cfg.cfg} x sp={cfg.sp} = {product} != world size "
            f"{world_size}{hint}; {fix_msg}use -1 for one axis to fill it; {valid_msg}")
    return cfg.dp, cfg.cfg, cfg.sp


# --------------------------------------------------------------------------- rank arithmetic


def rank_of(dp_rank: int, cfg_rank: int, sp_rank: int, cfg: int, sp: int) -> int:
    return (dp_rank * cfg + cfg_rank) * sp + sp_rank


def coords_of(rank: int, dp: int, cfg: int, sp: int) -> tuple[int, int, int]:
    """(dp_rank, cfg_rank, sp_rank) of a global rank."""
    if not 0 <= rank < dp * cfg * sp:
        raise ValueError(f"rank {rank} outside a mesh of {dp * cfg * sp}")
    return rank // (cfg * sp), (rank // sp) % cfg, rank % sp


def group_ranks(kind: str, dp: int, cfg: int, sp: int) -> list[list[int]]:
    """All groups of one kind, each a sorted list of global ranks, in a fixed order.

    sp: ranks sharing (dp, cfg); cfg: ranks sharing (dp, sp), the CFG pair;
    agree: the cfg x sp ranks of one dp index (one prompt); dp: ranks sharing (cfg, sp).
    """
    if kind == "sp":
        return [[rank_of(d, c, s, cfg, sp) for s in range(sp)] for d in range(dp) for c in range(cfg)]
    if kind == "cfg":
        return [[rank_of(d, c, s, cfg, sp) for c in range(cfg)] for d in range(dp) for s in range(sp)]
    if kind == "agree":
        n = cfg * sp
        return [list(range(d * n, (d + 1) * n)) for d in range(dp)]
    if kind == "dp":
        return [[rank_of(d, c, s, cfg, sp) for d in range(dp)] for c in range(cfg) for s in range(sp)]
    raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")


# --------------------------------------------------------------------------- mesh


@dataclass
class Mesh:
    """This rank's place in the dp x cfg x sp mesh, plus its process groups.

    Process groups (`groups`) exist only when the world size is > 1; a group of size 1 is None
    too (there is nothing to communicate). `Comm` takes the group by name.
    """

    world_size: int
    rank: int
    dp: int
    cfg: int
    sp: int
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: dict[str, Any] = field(default_factory=dict)
    owns_process_group: bool = False

    @classmethod
    def layout(cls, rank: int, world_size: int, dp: int, cfg: int, sp: int, **kw) -> "Mesh":
        """The pure arithmetic part: no process group."""
        if dp * cfg * sp != world_size:
            raise ValueError(f"dp*cfg*sp = {dp * cfg * sp} != world size {world_size}")
        coords_of(rank, dp, cfg, sp)  # range check
        return cls(world_size=world_size, rank=rank, dp=dp, cfg=cfg, sp=sp, **kw)

    # coordinates
    @property
    def dp_rank(self) -> int:
        return coords_of(self.rank, self.dp, self.cfg, self.sp)[0]

    @property
    def cfg_rank(self) -> int:
        return coords_of(self.rank, self.dp, self.cfg, self.sp)[1]

    @property
    def sp_rank(self) -> int:
        return coords_of(self.rank, self.dp, self.cfg, self.sp)[2]

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    # group membership (global ranks, sorted)
    def ranks(self, kind: str) -> list[int]:
        if kind == "world":
            return list(range(self.world_size))
        return next(g for g in group_ranks(kind, self.dp, self.cfg, self.sp) if self.rank in g)

    @property
    def agree_ranks(self) -> list[int]:
        return self.ranks("agree")

    def group_size(self, kind: str) -> int:
        return {"sp": self.sp, "cfg": self.cfg, "agree": self.cfg * self.sp, "dp": self.dp,
                "world": self.world_size}[kind]

    def group_rank(self, kind: str) -> int:
        """This rank's index inside its group of `kind`."""
        return self.ranks(kind).index(self.rank)

    @property
    def group_leader(self) -> int:
        """Lowest global rank of this prompt's agree group: the rank that writes files."""
        return self.agree_ranks[0]

    @property
    def is_group_leader(self) -> bool:
        return self.rank == self.group_leader

    def process_group(self, kind: str):
        """The torch process group for `kind`, or None when it has size 1 / no process group."""
        if kind not in ("world",) + GROUP_KINDS:
            raise ValueError(f"unknown group {kind!r}; expected world, {', '.join(GROUP_KINDS)}")
        return self.groups.get(kind)

    def describe(self) -> dict:
        """JSON-able summary for the run report."""
        return {"world_size": self.world_size, "rank": self.rank, "dp": self.dp, "cfg": self.cfg,
                "sp": self.sp, "dp_rank": self.dp_rank, "cfg_rank": self.cfg_rank,
                "sp_rank": self.sp_rank, "backend": self.backend, "device": str(self.device)}

    def destroy(self) -> None:
        """Tear down torch.distributed if init_mesh initialised it (every group goes with it)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.groups = {}
        self.owns_process_group = False

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


# --------------------------------------------------------------------------- init


def _env_int(name: str, env) -> int | None:
    v = env.get(name)
    return int(v) if v not in (None, "") else None


def launch_env(env=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them.

    Opt-in for launchers that start one task per rank without torchrun (submitit, `srun
    --ntasks-per-node=GPUS`): with SKIPSYNC_RANKS_FROM_SLURM=1 and no RANK, the Slurm task
    variables are used (MASTER_ADDR/MASTER_PORT must then be exported by the job script). It is
    opt-in because a plain batch script also sees SLURM_NTASKS and would wait for peers forever.
    """
    env = os.environ if env is None else env
    rank, world, local = _env_int("RANK", env), _env_int("WORLD_SIZE", env), _env_int("LOCAL_RANK", env)
    if rank is None and env.get("SKIPSYNC_RANKS_FROM_SLURM") == "1":
        rank, world = _env_int("SLURM_PROCID", env), _env_int("SLURM_NTASKS", env)
        local = _env_int("SLURM_LOCALID", env)
    if rank is None or world is None:
        return 0, 1, 0
    return rank, world, rank if local is None else local


def init_mesh(cfg: ParallelConfig | None = None) -> Mesh:
    """Build this rank's mesh from the launch environment, initialising torch.distributed.

    World size 1 initialises no process group at all. Every subgroup is created on every rank in
    the same order (a torch.distributed.new_group requirement), members or not.
    """
    cfg = cfg or ParallelConfig()
    rank, world_size, local_rank = launch_env()
    dp, c, sp = resolve_sizes(cfg, world_size)

    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    mesh = Mesh.layout(rank, world_size, dp, c, sp, local_rank=local_rank, device=device)
    if world_size == 1:
        return mesh

    timeout = timedelta(seconds=cfg.timeout_s)
    if dist.is_initialized():  # someone else owns it (e.g. a test harness); reuse
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, env says {world_size}")
    else:
        # rank and world size explicitly: with SKIPSYNC_RANKS_FROM_SLURM they come from Slurm's task
        # variables, and env:// would ask for RANK
        dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=world_size)
        mesh.owns_process_group = True
    mesh.backend = dist.get_backend()
    mesh.groups["world"] = dist.group.WORLD
    for kind in GROUP_KINDS:
        if mesh.group_size(kind) == 1:
            continue  # same on every rank, so skipping keeps the creation order identical
        for ranks in group_ranks(kind, dp, c, sp):
            # A group spanning the world is the world (e.g. agree with dp=1): no new communicator.
            pg = dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mesh.groups[kind] = pg
    return mesh
