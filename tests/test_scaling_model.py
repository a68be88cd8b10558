"""The scaling cost model (runner/scaling/costmodel.py): its collectives equal the counted ones
exactly, its FLOPs add up, the link fit, the predictions' key property, and the comm benchmark."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from models.flops import stdit3_flops
from models.stdit3 import STDiT3Config, build_stdit3, get_config
from parallel.dry import dry_comm
from parallel.layouts import parallelize
from runner.cache.metric import sums_per_site
from runner.distributed import Parallel
from runner.scaling import costmodel as cm
from runner.scaling import predict

pytestmark = pytest.mark.usefixtures("one_thread")

# 12 heads: Ulysses works at p = 2, 3 and 4. Latent 5 frames x 9 x 10: 5 patch rows (the last one
# half) and 5 token frames, split unevenly at every p.
ARCH = STDiT3Config(depth=2, hidden_size=96, num_heads=12, caption_channels=32, model_max_length=16)
LATENT = (4, 5, 9, 10)
TEXT = 7


@pytest.fixture(scope="module")
def meta_model():
    return build_stdit3(ARCH, device="meta", dtype=torch.bfloat16)


def _row(x) -> tuple:
    if isinstance(x, cm.Collective):
        return x.op, x.group_size, x.bytes, x.bytes_remote, x.bytes_in, x.tag
    return x.op, x.group_size, x.bytes_out, x.bytes_remote, x.bytes_in, x.tag


def counted_step(model, layout: str, p: int, cfg: int, rank: int, batch: int = 1, cfg_rank: int = 0):
    """One sampling step and the assemble of sp rank `rank`, as runner/distributed.py runs them, in a
    dry run on the meta device: -> (the step's events, the assemble's events)."""
    comm = dry_comm(cfg_rank * p + rank, cfg=cfg, sp=p)
    par = Parallel(comm.mesh, comm, layout)
    par.layout = parallelize(model, comm.mesh, comm, layout)
    try:
        z = torch.empty(batch, *LATENT, device="meta")
        y = torch.empty(2 * batch, TEXT, ARCH.caption_channels, device="meta")
        mask = torch.ones(batch, TEXT, device="meta")
        run = par.start(z, y, mask, 7.0)
        run.on_step(0, "start")
        z_in = run.z if cfg == 2 else torch.cat([run.z, run.z])  # the sampler's CFG batch
        with torch.no_grad():
            out = model(z_in, torch.full((z_in.shape[0],), 900.0, device="meta"), run.y, mask, rows=run.rows)
        if run.cfg_combine is not None:
            run.cfg_combine(out[:, :LATENT[0]])
        run.on_step(0, "end")
        run.assemble(run.z.float())
        step = [e for e in comm.log.events if e.step == 0]
        return step, [e for e in comm.log.events if e.phase == "assemble"]
    finally:
        par.layout.remove()


@pytest.mark.parametrize("layout", ["dsp", "ulysses"])
@pytest.mark.parametrize("p", [2, 3, 4])
def test_model_bytes_equal_the_counted_collectives(meta_model, layout, p):
    for cfg, cfg_rank in ((1, 0), (2, 0), (2, 1)):  # the cfg half changes nothing but the batch
        for rank in range(p):
            step, assemble = counted_step(meta_model, layout, p, cfg, rank, cfg_rank=cfg_rank)
            model = cm.step_collectives(ARCH, LATENT, TEXT, layout, p, cfg, rank, dtype_bytes=2)
            assert [_row(e) for e in step] == [_row(c) for c in model], (layout, p, cfg, rank)
            assert [_row(e) for e in assemble] == [_row(cm.assemble_collective(ARCH, LATENT, p, rank))]
    # the uneven split really is uneven here, and the op counts are the layout's
    assert len({c.bytes for c in cm.layout_collectives(ARCH, LATENT, layout, p, 1, 0, 2)}
               | {c.bytes for c in cm.layout_collectives(ARCH, LATENT, layout, p, 1, p - 1, 2)}) > 1
    per_block = 2 if layout == "dsp" else 4
    assert len(cm.layout_collectives(ARCH, LATENT, layout, p, 1, 0, 2)) == per_block * ARCH.depth


def test_model_bytes_with_two_prompts(meta_model):
    step, _ = counted_step(meta_model, "ulysses", 3, 2, 2, batch=2)
    assert [_row(e) for e in step] == [_row(c) for c in cm.step_collectives(ARCH, LATENT, TEXT, "ulysses", 3, 2, 2,
                                                                              2, batch=2)]


def test_agreement_is_what_adacache_sends():
    # AdaCache's default (one metric site, no MoReg): float64 partial sums, sums_per_site of them
    assert cm.ADACACHE_SCALARS == sums_per_site(5, None)
    a = cm.agreement(cm.ADACACHE_SCALARS, 4)
    assert (a.op, a.group, a.bytes, a.bytes_remote, a.bytes_in) == ("all_reduce", "agree", 16, 48, 48)
    # decisions: computed steps after the first computed one, never the last step
    assert cm.decision_steps([True, True, False, True, False, True]) == [False, True, False, True, False, False]
    pat = cm.spread_pattern(30, 13)
    assert sum(pat) == 13 and pat[0] and pat[1] and pat[28] and pat[29]


@pytest.mark.parametrize("layout", ["dsp", "ulysses"])
@pytest.mark.parametrize("p,cfg", [(2, 1), (3, 1), (4, 1), (3, 2)])
def test_shard_flops_add_up(layout, p, cfg):
    full = stdit3_flops(ARCH, 2, *LATENT[1:], TEXT).total
    rep = cm.replicated_flops(ARCH, cm.rank_batch(cfg, 1), TEXT)
    tokens = sum(cm.shard_flops(ARCH, LATENT, TEXT, layout, p, cfg, r) - rep for r in range(p))
    # every token-proportional part (and the attention) is shared out exactly; with cfg=2 the two
    # halves of the pair each do half
    assert tokens * cfg == full - cfg * rep
    assert cm.shard_flops(ARCH, LATENT, TEXT, layout, 1, 1, 0) == full
    assert sum(cm.token_share(ARCH, LATENT, p, cfg, r) for r in range(p)) * cfg == pytest.approx(1.0)


def test_shard_flops_of_xl2_at_one_gpu():
    xl, latent = get_config("STDiT3-XL/2"), predict.SIZES["720p-4s"]
    assert cm.shard_flops(xl, latent, 300, "dsp", 1, 1, 0) == stdit3_flops(xl, 2, 30, 90, 160, 300).total


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [4096 * 8 ** k for k in range(6)]
    for lat, bw in ((25e-6, 80e9), (1e-3, 3e8)):
        f = cm.fit_link(sizes, [lat + s / bw for s in sizes])
        assert f.latency_s == pytest.approx(lat, rel=1e-6) and f.bandwidth_Bps == pytest.approx(bw, rel=1e-6)
        noisy = cm.fit_link(sizes, [(lat + s / bw) * (1.05 if i % 2 else 0.95) for i, s in enumerate(sizes)])
        assert noisy.latency_s == pytest.approx(lat, rel=0.2) and noisy.bandwidth_Bps == pytest.approx(bw, rel=0.2)
    # a negative intercept is clamped: the refit goes through the origin
    f = cm.fit_link([1e3, 1e6], [0.0, 1e-3])
    assert f.latency_s == 0.0 and f.bandwidth_Bps > 0


def test_commfit_json_round_trip_and_lookup(tmp_path):
    fit = cm.CommFit({("all_to_all", 2): cm.LinkFit(1e-4, 1e9), ("all_to_all", 4): cm.LinkFit(2e-4, 5e8),
                      ("all_gather", 2): cm.LinkFit(3e-4, 2e9)}, {"backend": "gloo"})
    fit.save(tmp_path / "f.json")
    back = cm.CommFit.load(tmp_path / "f.json")
    assert back.links == fit.links and back.meta["backend"] == "gloo"
    c = cm.Collective("all_to_all", 3, 4000, 3000, 2000)
    assert back.time(c) == pytest.approx(1e-4 + 3000 / 1e9)  # nearest group size (ties: the smaller)
    assert back.time(cm.agreement(2, 2)) == pytest.approx(3e-4 + 16 / 2e9)  # no all_reduce: all_gather's


def _h100(layout, sp, pattern, peers=False, reused_fraction=None):
    xl, latent = get_config("STDiT3-XL/2"), predict.SIZES["720p-4s"]
    hw = cm.hardware_for("h100-nvlink", sp)
    frac = cm.paper_reused_fraction() if reused_fraction is None else reused_fraction
    step_s = stdit3_flops(xl, 2, *latent[1:], 300).total / hw.achieved_flops
    kw = dict(comm=hw.comm(sp), flops_per_s=hw.achieved_flops, reused_s=frac * step_s)
    if peers:
        return cm.peer_predict_video(xl, latent, 300, layout, sp, pattern, **kw)
    return cm.predict_video(xl, latent, 300, layout, sp, pattern, agreement_scalars=cm.ADACACHE_SCALARS, **kw)


@pytest.mark.parametrize("reused_fraction", [None, 0.0])
def test_skipsync_keeps_more_of_the_cache_gain_than_the_peers(reused_fraction):
    full, ada = [True] * 30, cm.spread_pattern(30, 13)
    for layout in ("dsp", "ulysses"):
        keep = {}
        for who in (False, True):
            speed = [_h100(layout, n, full, who, reused_fraction)["total_s"]
                     / _h100(layout, n, ada, who, reused_fraction)["total_s"] for n in (1, 8)]
            keep[who] = speed[1] / speed[0]
        # with reused_fraction 0 the difference is the peers' communication on cached steps alone
        assert keep[False] > keep[True], (layout, keep)


def test_all_computed_steps_equal_the_no_cache_prediction():
    full = [True] * 30
    for layout in ("dsp", "ulysses"):
        a = _h100(layout, 8, full)
        no_agree = cm.predict_video(get_config("STDiT3-XL/2"), predict.SIZES["720p-4s"], 300, layout, 8, full,
                                    cm.HARDWARE["h100-nvlink"].comm(8), cm.HARDWARE["h100-nvlink"].achieved_flops)
        decisions = sum(cm.decision_steps(full))
        agree = cm.HARDWARE["h100-nvlink"].comm(8).time(cm.agreement(cm.ADACACHE_SCALARS, 8))
        assert a["total_s"] == pytest.approx(no_agree["total_s"] + decisions * agree, rel=1e-12)
        assert a["reused_s"] == 0 and a["computed_steps"] == 30


def test_one_gpu_reproduces_the_calibration():
    # 1 A100, 480p 2s: the paper's 54.02 s without cache and 24.16 s with AdaCache (13 of 30 computed)
    xl, latent, hw = get_config("STDiT3-XL/2"), predict.SIZES["480p-2s"], cm.HARDWARE["a100-nvlink"]
    step_s = cm.paper_step_flops() / hw.achieved_flops
    kw = dict(comm=hw.comm(1), flops_per_s=hw.achieved_flops, reused_s=cm.paper_reused_fraction() * step_s)
    assert cm.predict_video(xl, latent, 300, "dsp", 1, [True] * 30, **kw)["total_s"] == pytest.approx(54.02)
    assert cm.predict_video(xl, latent, 300, "dsp", 1, cm.spread_pattern(30, 13), **kw)["total_s"] == pytest.approx(
        24.16)


def test_hardware_multi_node_links():
    hw = cm.hardware_for("h100-nvlink", 16)
    assert hw.name == "h100-nvlink-ndr" and cm.hardware_for("h100-nvlink", 8).name == "h100-nvlink"
    c = cm.Collective("all_to_all", 16, 16 << 20, 15 << 20, 15 << 20)
    inside, across = hw.comm(8, cfg=2), hw.comm(16)
    b = 15 << 20  # 8 of a rank's 15 peers are on the other node: that share goes over InfiniBand NDR
    assert across.time(c) == pytest.approx(40e-6 + max(b * 7 / 15 / 450e9, b * 8 / 15 / 50e9))
    assert inside.time(dataclasses.replace(c, group_size=8)) == pytest.approx(20e-6 + b / 450e9)
    # the cfg pair of a 2 x 8 mesh sits on two nodes (ranks 8 apart); of a 2 x 4 mesh on one
    pair = cm.Collective("all_gather", 2, 1 << 20, 1 << 20, 1 << 20, "cfg", "cfg")
    assert hw.comm(8, cfg=2).time(pair) == pytest.approx(40e-6 + (1 << 20) / 50e9)
    assert hw.comm(4, cfg=2).time(pair) == pytest.approx(20e-6 + (1 << 20) / 450e9)
    with pytest.raises(ValueError, match="multi-node"):
        cm.HARDWARE["a100-nvlink"].comm(16)


def test_predict_prints_the_table(capsys):
    assert predict.main(["--gpus", "1", "8", "32", "--size", "720p-4s"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | dsp | sp8 |" in out and "| 32 | ulysses | n/a" in out and "check: peers' scheme" in out


@pytest.mark.slow
def test_commbench_under_torchrun(tmp_path, repo_root):
    out = tmp_path / "fit.json"
    cmd = [sys.executable, "-m", "runner.launch", "--standalone", "--nproc_per_node=2", "-m",
           "runner.scaling.commbench", "--out", str(out), "--sizes", "4096", "1048576", "--reps", "2",
           "--warmup", "1", "--ops", "all_to_all", "all_gather"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_root}
    res = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    d = json.loads(out.read_text())
    assert d["backend"] == "gloo" and d["world_size"] == 2 and len(d["points"]) == 4
    fit = cm.CommFit.from_json(d)
    for op in ("all_to_all", "all_gather"):
        f = fit.links[op, 2]
        assert f.latency_s > 0 and f.bandwidth_Bps > 0
