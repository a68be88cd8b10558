"""Mesh sizes and rank arithmetic (pure logic, one process), plus init_mesh on a few gloo ranks."""

import pytest

from dist_util import run_dist
from parallel.mesh import (Mesh, ParallelConfig, coords_of, group_ranks, init_mesh, launch_env,
                           rank_of, resolve_sizes, valid_sizes)


@pytest.mark.parametrize("cfg, world, expected", [
    (ParallelConfig(), 1, (1, 1, 1)),
    (ParallelConfig(sp=8), 8, (1, 1, 8)),
    (ParallelConfig(dp=2, cfg=2, sp=2), 8, (2, 2, 2)),
    (ParallelConfig(sp=-1), 6, (1, 1, 6)),
    (ParallelConfig(cfg=2, sp=-1), 6, (1, 2, 3)),
    (ParallelConfig(dp=-1, sp=2), 8, (4, 1, 2)),
    (ParallelConfig(dp=2, cfg=-1, sp=2), 8, (2, 2, 2)),
    (ParallelConfig(dp=4, cfg=-1, sp=2), 8, (4, 1, 2)),
])
def test_resolve_sizes(cfg, world, expected):
    assert resolve_sizes(cfg, world) == expected


@pytest.mark.parametrize("cfg, world, needles", [
    # wrong product: suggests the value for each axis that would work, and lists valid combos
    (ParallelConfig(dp=2, cfg=2, sp=3), 8, ["= 12 != world size 8", "set sp=2",
                                            "dp=2 cfg=2 sp=2"]),
    (ParallelConfig(dp=3, cfg=1, sp=2), 8, ["set dp=4,"]),
    (ParallelConfig(sp=4), 6, ["set sp=6", "valid for world size 6"]),
    (ParallelConfig(sp=2), 1, ["without torchrun"]),
    (ParallelConfig(cfg=3, sp=1), 3, ["cfg must be 1 or 2"]),
    (ParallelConfig(cfg=2, sp=-1), 5, ["cannot fill sp=-1", "does not divide world size 5",
                                       "[1, 5]"]),
    (ParallelConfig(dp=1, cfg=-1, sp=2), 8, ["cfg=4", "cfg must be 1 or 2"]),
    (ParallelConfig(dp=-1, sp=-1), 4, ["at most one"]),
    (ParallelConfig(sp=0), 4, ["must be >= 1 or -1"]),
])
def test_resolve_sizes_errors_say_what_works(cfg, world, needles):
    with pytest.raises(ValueError) as err:
        resolve_sizes(cfg, world)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_valid_sizes():
    assert valid_sizes(4) == [(4, 1, 1), (2, 1, 2), (1, 1, 4), (2, 2, 1), (1, 2, 2)]
    for d, c, s in valid_sizes(12):
        assert d * c * s == 12 and c in (1, 2)
        assert resolve_sizes(ParallelConfig(dp=d, cfg=c, sp=s), 12) == (d, c, s)


def test_rank_arithmetic_roundtrip():
    dp, cfg, sp = 3, 2, 4
    for r in range(dp * cfg * sp):
        d, c, s = coords_of(r, dp, cfg, sp)
        assert rank_of(d, c, s, cfg, sp) == r
        assert 0 <= d < dp and 0 <= c < cfg and 0 <= s < sp
    with pytest.raises(ValueError):
        coords_of(24, dp, cfg, sp)


def test_groups_world8_dp2_cfg2_sp2():
    dp, cfg, sp = 2, 2, 2
    assert group_ranks("sp", dp, cfg, sp) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks("cfg", dp, cfg, sp) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks("agree", dp, cfg, sp) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_ranks("dp", dp, cfg, sp) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # every kind partitions the world
    for kind in ("sp", "cfg", "agree", "dp"):
        assert sorted(r for g in group_ranks(kind, dp, cfg, sp) for r in g) == list(range(8))

    m = Mesh.layout(rank=6, world_size=8, dp=2, cfg=2, sp=2)
    assert (m.dp_rank, m.cfg_rank, m.sp_rank) == (1, 1, 0)
    assert m.ranks("sp") == [6, 7] and m.ranks("cfg") == [4, 6]
    assert m.agree_ranks == [4, 5, 6, 7] and m.ranks("dp") == [2, 6]
    assert m.group_rank("agree") == 2 and m.group_rank("sp") == 0 and m.group_rank("dp") == 1
    assert m.group_leader == 4 and not m.is_group_leader
    assert Mesh.layout(4, 8, 2, 2, 2).is_group_leader
    assert m.is_distributed and m.process_group("sp") is None  # arithmetic only: no process group
    assert [m.group_size(k) for k in ("sp", "cfg", "agree", "dp", "world")] == [2, 2, 4, 2, 8]


def test_group_members_share_coordinates():
    dp, cfg, sp = 2, 2, 3
    same = {"sp": (0, 1), "cfg": (0, 2), "agree": (0,), "dp": (1, 2)}
    for kind, fixed in same.items():
        for g in group_ranks(kind, dp, cfg, sp):
            coords = [coords_of(r, dp, cfg, sp) for r in g]
            assert len({tuple(c[i] for i in fixed) for c in coords}) == 1
        assert len(group_ranks(kind, dp, cfg, sp)) == 12 // len(group_ranks(kind, dp, cfg, sp)[0])


def test_single_process_mesh_has_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SKIPSYNC_RANKS_FROM_SLURM"):
        monkeypatch.delenv(var, raising=False)
    import torch.distributed as dist
    m = init_mesh(ParallelConfig(sp=-1))
    assert (m.world_size, m.rank, m.dp, m.cfg, m.sp) == (1, 0, 1, 1, 1)
    assert not m.is_distributed and m.groups == {} and not dist.is_initialized()
    assert m.is_group_leader and m.ranks("sp") == [0]
    m.destroy()
    with pytest.raises(ValueError, match="without torchrun"):
        init_mesh(ParallelConfig(sp=2))


def test_launch_env():
    assert launch_env({}) == (0, 1, 0)
    assert launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert launch_env(slurm) == (0, 1, 0)  # opt-in only: a batch script also sees SLURM_NTASKS
    assert launch_env({**slurm, "SKIPSYNC_RANKS_FROM_SLURM": "1"}) == (5, 8, 1)
    assert launch_env({**slurm, "SKIPSYNC_RANKS_FROM_SLURM": "1", "RANK": "2",
                       "WORLD_SIZE": "4", "LOCAL_RANK": "2"}) == (2, 4, 2)  # torchrun wins


def _mesh_groups(rank, world_size):
    import torch
    import torch.distributed as dist
    mesh = init_mesh(ParallelConfig(dp=-1, cfg=2, sp=2, timeout_s=30))
    out = {"coords": (mesh.dp_rank, mesh.cfg_rank, mesh.sp_rank), "backend": mesh.backend}
    for kind in ("sp", "cfg", "agree", "dp"):
        pg = mesh.process_group(kind)
        if pg is None:
            out[kind] = None
            continue
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=pg)  # sum of member ranks proves the membership
        out[kind] = (float(t), dist.get_world_size(pg))
    mesh.destroy()
    out["after_destroy"] = dist.is_initialized()
    return out


@pytest.mark.slow
def test_init_mesh_groups_on_gloo():
    # world 4 = dp1 x cfg2 x sp2: dp groups have one rank (None), agree is the world
    res = run_dist(_mesh_groups, 4, timeout=60)
    for r, out in enumerate(res):
        m = Mesh.layout(r, 4, 1, 2, 2)
        assert out["coords"] == (m.dp_rank, m.cfg_rank, m.sp_rank)
        assert out["backend"] == "gloo"
        for kind in ("sp", "cfg", "agree"):
            assert out[kind] == (float(sum(m.ranks(kind))), len(m.ranks(kind))), kind
        assert out["dp"] is None
        assert out["after_destroy"] is False
