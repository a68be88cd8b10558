"""runner.estimate: the size check before any weights load (issue 13, item 5)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ROOT, make_cfg, subprocess_env

from models.stdit3 import CONFIGS, build_stdit3, get_config
from runner import estimate as E
from runner.config import UserError, resolve_presets
from runner.families.demo import DEMO_ARCH

CPU = torch.device("cpu")
GB = 10**9
BIG = 10**15  # bytes: memory that never limits


def cfg_of(*overrides):
    return resolve_presets(make_cfg(*overrides))


def test_param_count_matches_the_built_model():
    for arch in (DEMO_ARCH, get_config("STDiT3-XL/2", depth=2), CONFIGS["STDiT3-tiny"]):
        m = build_stdit3(arch, device="meta")
        built = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
        assert E.stdit3_param_count(arch) == built


def test_demo_720p_4s_is_refused_with_figure_and_limit():
    cfg = cfg_of("preset=720p-4s")
    est = E.estimate(cfg, device=CPU)
    assert est.peak > 24 * GB and est.main_part == "activations"
    with pytest.raises(UserError) as e:
        E.check(cfg, CPU, available=24 * GB, flops_per_s=1e12)
    msg = str(e.value)
    assert f"{est.peak / GB:.1f} GB" in msg and "24.0 GB" in msg
    assert "720x1280" in msg and "parallel.sp=N" in msg and "model.dtype=bfloat16" in msg


def test_height_100000_is_refused_on_8gb_and_slow_otherwise():
    cfg = cfg_of("height=100000")
    with pytest.raises(UserError, match="8.0 GB"):
        E.check(cfg, CPU, available=8 * GB, flops_per_s=1e12)
    warnings = E.check(cfg, CPU, available=BIG, flops_per_s=1e12)
    assert len(warnings) == 1 and "s per step" in warnings[0]


def test_height_width_100000_is_refused_against_this_machine():
    # The unguarded run died on a 960 GB allocation (the noise alone): far beyond any host here.
    cfg = cfg_of("height=100000", "width=100000")
    est = E.estimate(cfg, device=CPU)
    assert est.parts["latents"] > 960 * GB
    with pytest.raises(UserError) as e:
        E.check(cfg, CPU)  # the real reading of /proc/meminfo and the cgroup
    assert f"{est.peak / GB:.1f} GB" in str(e.value) and "100000x100000" in str(e.value)


def test_240p_2s_fits_but_is_warned_as_slow():
    cfg = cfg_of("preset=240p-2s")
    warnings = E.check(cfg, CPU, available=24 * GB, flops_per_s=150e9)  # faster than this CPU's matmuls
    assert len(warnings) == 1
    step_s = E.estimate(cfg, device=CPU).seconds_per_step(150e9)
    assert step_s > E.SLOW_STEP_S and f"{step_s:,.0f} s per step" in warnings[0]
    assert E.check(cfg, CPU, available=24 * GB, flops_per_s=1e15) == []  # a fast device: silent


def test_default_run_passes_without_warning():
    assert E.check(make_cfg(), CPU) == []  # the real memory reading and matmul measurement


def test_sp_and_cfg_parallel_split_the_tokens():
    cfg = cfg_of("preset=240p-2s")  # tokens: 2 x 51 frames x 60 x 107 patches
    one = E.estimate(cfg, device=CPU)
    sp2 = E.estimate(cfg, sp=2, device=CPU)
    cfg2 = E.estimate(cfg, cfg_parallel=2, device=CPU)
    # DSP's larger share: 26 of 51 frames (spatial attention) beats 30 of 60 rows.
    assert one.tokens == 2 * 51 * 60 * 107 and sp2.tokens == 2 * 26 * 60 * 107 and cfg2.tokens == 51 * 60 * 107
    assert sp2.parts["activations"] < 0.52 * one.parts["activations"]
    assert cfg2.parts["activations"] * 2 == one.parts["activations"]
    assert sp2.parts["weights"] == one.parts["weights"]  # every rank holds the whole model
    assert sp2.flops_per_step * 2 <= one.flops_per_step


def test_opensora_on_a_24gb_card_is_refused_for_t5():
    cfg = cfg_of("model=opensora-v1.2", "model.weights_dir=/nowhere")
    cuda = torch.device("cuda")  # estimated only: no CUDA call when the limit is given
    est = E.estimate(cfg, device=cuda)
    assert est.peak_phase == "text encoding" and est.main_part == "text"
    with pytest.raises(UserError, match="model.text_dtype=bfloat16"):
        E.check(cfg, cuda, available=20 * GB)


def test_host_memory_limit_reads_meminfo_and_cgroups(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684096 kB\nMemFree:  1 kB\nMemAvailable:   2000000 kB\n")
    v2, v1, unlimited = tmp_path / "memory.max", tmp_path / "limit", tmp_path / "v1-unlimited"
    v2.write_text("max\n")
    v1.write_text("1500000000\n")
    unlimited.write_text("9223372036854771712\n")
    assert E.host_memory_limit(str(meminfo), [str(v2), str(unlimited)]) == 2000000 * 1024
    assert E.host_memory_limit(str(meminfo), [str(v2), str(v1), str(tmp_path / "missing")]) == 1500000000
    assert E.host_memory_limit(str(tmp_path / "missing"), [str(v1)]) == 1500000000
    assert E.host_memory_limit(str(tmp_path / "missing"), []) is None


def test_cgroup_files_follow_this_process_cgroup(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/jobs/a\n3:cpu,cpuacct:/\n0::/user.slice/b\n")
    files = E._cgroup_files(str(proc), "/cg")
    assert "/cg/memory/jobs/a/memory.limit_in_bytes" in files and "/cg/user.slice/b/memory.max" in files


def test_available_memory_is_shared_by_local_ranks(monkeypatch):
    monkeypatch.setattr(E, "host_memory_limit", lambda: 8 * GB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert E.available_memory(CPU)[0] == 4 * GB
    assert E.available_memory(CPU, local_ranks=4)[0] == 2 * GB


MEASURE = textwrap.dedent("""
    import json, torch
    from runner.families.demo import DEMO_ARCH, random_demo
    from runner.sampler import SamplerSettings, make_timesteps, sample
    torch.set_num_threads(1)
    pipe = random_demo(DEMO_ARCH, 0, torch.device("cpu"), torch.float32)
    cond = pipe.encode_text(["x"])
    z = torch.randn(1, 3, 16, 64, 64)
    s = SamplerSettings(num_steps=1, use_timestep_transform=False)
    def rss(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    before = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    with torch.no_grad():
        sample(lambda x, t, i: pipe.dit(x, t, cond.y, cond.mask), z, s, make_timesteps(s, 64, 64, 16), 3)
    print(json.dumps({"increase": rss("VmHWM:") - before}))
""")


def test_a_small_measured_run_stays_below_the_estimate():
    est = E.estimate(cfg_of("model=demo-random", "height=64", "width=64", "num_frames=16"), device=CPU)
    run = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    if run.returncode and "clear_refs" in run.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert run.returncode == 0, run.stderr[-2000:]
    increase = int(run.stdout.strip().splitlines()[-1].split(":")[1].strip(" }"))
    bound = est.parts["latents"] + est.parts["activations"] + est.parts["workspace"]  # what sampling adds
    assert 0.25 * bound < increase <= bound


def test_opensora_parts_are_counted_from_the_weights_dir(weights_dir):
    from runner.estimate import T5_XXL_PARAMS, estimate, stored_params

    cfg = make_cfg("model=opensora-v1.2", f"model.weights_dir={weights_dir}", "prompt=x", "height=16", "width=16",
                   "num_frames=1")
    est = estimate(cfg, device=torch.device("cpu"))
    t5 = stored_params(os.path.join(weights_dir, "t5"))
    assert 0 < t5 < T5_XXL_PARAMS / 1000  # the tiny test T5, not T5-XXL
    assert est.parts["text"] == t5 * 4  # model.text_dtype float32
    published = estimate(make_cfg("model=opensora-v1.2", "model.weights_dir=/nonexistent", "prompt=x", "height=16",
                                  "width=16", "num_frames=1"), device=torch.device("cpu"))
    assert published.parts["text"] == T5_XXL_PARAMS * 4 and est.peak < published.peak / 100
