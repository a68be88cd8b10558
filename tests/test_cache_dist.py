"""AdaCache across ranks (gloo): the global metric from partial sums equals the single-process
metric; the decision's one all-reduce is the only traffic a computed step adds and a cached step
adds none; `verify_agreement` turns a divergence into an error instead of a hang.

Without a sequence-parallel layout the model cannot run row-sharded, so these runs use what needs
no layout: cfg=2 (each rank runs one CFG half of the full model; the velocity exchange is an
all_gather on the cfg group) and a replicated sp group (every rank runs the whole model; the
agreement all-reduce still spans the group).
"""

from __future__ import annotations

import json

import pytest
import torch

from parallel.comm import Comm, split_range
from parallel.mesh import ParallelConfig, init_mesh
from runner.cache import AdaCache
from runner.cache import adacache as adacache_mod
from runner.cache.codebook import select_codebook
from runner.cache.metric import MoRegParams, decide, site_sums
from runner.sampler import guidance
from tests.cache_util import STEPS, cache_cfg, inputs, run, tiny_model
from tests.dist_util import DistError, run_dist

pytestmark = pytest.mark.usefixtures("one_thread")

MO = MoRegParams(window=(4, 26), strides=(1, 2))


def _residuals(t=5, s=7, c=6):
    g = torch.Generator().manual_seed(3)
    prev = torch.randn(2, t, s, c, generator=g)
    cur = prev + 0.3 * torch.randn(2, t, s, c, generator=g)
    return prev, cur


def _partial(rank, world_size):
    """Rank r's share of the rows (uneven)."""
    mesh = init_mesh(ParallelConfig(sp=world_size, timeout_s=30))
    comm = Comm(mesh)
    prev, cur = _residuals()
    a, b = split_range(prev.shape[2], world_size, rank)
    sums = site_sums(prev[:, :, a:b], cur[:, :, a:b], 10, MO)
    comm.all_reduce(sums, group="agree")
    log = comm.log.per_step()
    mesh.destroy()
    return sums.tolist(), len(comm.log.events), log


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_global_metric_from_partial_sums_equals_single_process(world_size):
    prev, cur = _residuals()
    full = site_sums(prev, cur, 10, MO).tolist()
    want, _ = decide(full, 9, 2, select_codebook(30), 1, MO, [1.0])
    for sums, n_events, _ in run_dist(_partial, world_size, timeout=60):
        assert n_events == 1
        assert sums == pytest.approx(full, rel=1e-6)
        got, _ = decide(sums, 9, 2, select_codebook(30), 1, MO, [1.0])
        assert got.rel_l1[0] == pytest.approx(want.rel_l1[0], rel=1e-6)
        assert got.motion[0] == pytest.approx(want.motion[0], rel=1e-6)
        assert got.c == pytest.approx(want.c, rel=1e-6) and got.rate == want.rate


# ------------------------------------------------------------------ whole runs


def _generation(rank, world_size, cfg_size, kw, perturb_rank):
    """One cached generation on a mesh (cfg_size=2: CFG-parallel; else a replicated sp group)."""
    mesh = init_mesh(ParallelConfig(cfg=cfg_size, sp=world_size // cfg_size, timeout_s=20))
    comm = Comm(mesh)
    z, y, mask = inputs()
    model = tiny_model()
    policy = AdaCache(cache_cfg(**kw), comm)
    policy.install(model)
    if rank == perturb_rank:  # inject a divergence: this rank's reduced distance is off by 1 %
        real = adacache_mod.decide

        def perturbed(sums, *args):
            sums = list(sums)
            if args[0] == 7:
                sums[0] *= 1.01
            return real(sums, *args)

        adacache_mod.decide = perturbed
    cfg_combine, half = None, None
    if cfg_size == 2:
        half = slice(mesh.cfg_rank, mesh.cfg_rank + 1)

        def cfg_combine(v):
            both = comm.all_gather(v.contiguous(), "cfg", dim=0, tag="cfg")
            return guidance(*both.chunk(2), 7.0)

    stage = policy.blocks

    def announced(e, step):  # collectives counted per step
        comm.log.set_step(step.index)
        return stage(e, step)

    policy.blocks = announced
    out = run(model, policy, z, y, mask, cfg_combine=cfg_combine, batch_slice=half)
    per_step = json.loads(json.dumps(comm.log.per_step()))
    mesh.destroy()
    return out, policy.report(), per_step


def _single(kw):
    z, y, mask = inputs()
    model = tiny_model()
    policy = AdaCache(cache_cfg(**kw))
    policy.install(model)
    return run(model, policy, z, y, mask), policy.report()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"moreg": True}])
def test_cfg_parallel_same_schedule_and_only_the_velocity_exchange_on_cached_steps(kw):
    want, want_rep = _single(kw)
    results = run_dist(_generation, 2, 2, kw, -1, timeout=60)
    for out, rep, per_step in results:
        assert rep["computed_steps"] == want_rep["computed_steps"]
        assert [d["c"] for d in rep["decisions"]] == pytest.approx([d["c"] for d in want_rep["decisions"]], rel=1e-6)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        decided = {d["step"] for d in rep["decisions"]}
        for step in range(STEPS):
            ops = per_step[str(step)]
            assert ops["all_gather"]["count"] == 1  # the velocity exchange in the CFG pair, every step
            if step in decided:
                n_sums = 4 if kw.get("moreg") and 4 <= step + 1 <= 26 else 2  # + MoReg's 2 per stride in its window
                assert ops["all_reduce"]["count"] == 1 and ops["all_reduce"]["bytes"] == n_sums * 8  # float64
            else:
                assert "all_reduce" not in ops
            assert set(ops) <= {"all_gather", "all_reduce"}
    assert want_rep["pattern"].count("R") > 0


@pytest.mark.slow
def test_sp_group_cached_steps_run_no_collective_computed_steps_one_small_all_reduce():
    results = run_dist(_generation, 2, 1, {}, -1, timeout=60)
    _, want_rep = _single({})
    for _, rep, per_step in results:
        assert rep["computed_steps"] == want_rep["computed_steps"]
        decided = {d["step"] for d in rep["decisions"]}
        for step in range(STEPS):
            if rep["pattern"][step] == "R":
                assert per_step[str(step)] == {}  # a cached step talks to nobody
            elif step in decided:
                assert per_step[str(step)] == {"all_reduce": {"count": 1, "bytes": 16, "bytes_remote": 16,
                                                              "bytes_in": 16}}
            else:  # the first step (no previous residual) and the last (no consumer of a decision)
                assert per_step[str(step)] == {}


@pytest.mark.slow
def test_verify_agreement_turns_a_divergence_into_an_error():
    # Without verification the perturbed run silently diverges (here no layout collective would
    # hang; with a layout the ranks would wait on different collectives).
    ok = run_dist(_generation, 2, 1, {"verify_agreement": True}, -1, timeout=60)
    assert ok[0][1]["agreement"]["verified"]
    with pytest.raises(DistError, match="AdaCache decisions diverged at step 7") as e:
        run_dist(_generation, 2, 1, {"verify_agreement": True}, 1, timeout=60)
    assert "CacheAgreementError" in str(e.value)
    assert "timed out" not in str(e.value)
