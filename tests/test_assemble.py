"""The assembly (runner/assemble.py): the parts meet in one documented order, the job carries them,
the model is left as loaded when a job is released, and compile=true gives the eager result."""

import pytest
import torch

from runner.assemble import assemble
from runner.cache import AdaCache, NoCache, PAB
from runner.generate import generate_one
from tests.helpers import make_cfg

FAST = ("model=demo-random", "sampler.num_steps=4", "progress=false", "num_frames=4", "height=16", "width=16")


def test_the_job_holds_the_parts_and_runs_the_policy_through_the_explicit_stage():
    cfg = make_cfg("prompt=x", *FAST, "cache=adacache")
    job = assemble(cfg, torch.device("cpu"), torch.float32)
    assert isinstance(job.policy, AdaCache) and job.policy.model is job.dit
    assert job.layout is job.par.layout and job.layout.num_hooked == 0  # one process: nothing hooked
    assert "blocks" not in job.dit.__dict__  # the stage is called by the forward, not patched in
    _, latent, _ = generate_one(job, cfg, "a red circle moves left", seed=1)
    assert len(job.policy.report()["pattern"]) == 4
    job.release()
    assert job.policy.model is None


def test_released_policies_leave_the_model_as_loaded():
    cfg = make_cfg("prompt=x", *FAST)
    plain = assemble(cfg, torch.device("cpu"), torch.float32)
    _, want, _ = generate_one(plain, cfg, "a red circle", seed=3)
    plain.release()
    names = dict(plain.dit.named_modules())
    for cache in ("pab246", "adacache", "teacache"):  # PAB and AdaCache shadow branches, then undo it
        job = assemble(make_cfg("prompt=x", *FAST, f"cache={cache}"), pipe=plain.pipe)
        generate_one(job, cfg, "a red circle", seed=3)
        job.release()
    again = assemble(cfg, pipe=plain.pipe)
    assert isinstance(again.policy, NoCache) and dict(again.dit.named_modules()) == names
    _, got, _ = generate_one(again, cfg, "a red circle", seed=3)
    assert torch.equal(got, want)
    assert not any(set(b.__dict__) & {"attn", "attn_delta", "cross_attn", "cross_delta", "mlp", "mlp_delta"}
                   for b in [*again.dit.spatial_blocks, *again.dit.temporal_blocks])


def test_pab_on_a_job_reuses_modules():
    cfg = make_cfg("prompt=x", *FAST, "cache=pab246", "sampler.num_steps=30")
    job = assemble(cfg, torch.device("cpu"), torch.float32)
    assert isinstance(job.policy, PAB)
    generate_one(job, cfg, "a red circle", seed=3)
    assert job.policy.computed_fraction() < 1


@pytest.mark.slow
def test_compile_gives_the_eager_latent():
    cfg = make_cfg("prompt=x", "progress=false", "sampler.num_steps=3")  # the shipped demo model
    eager = assemble(cfg, torch.device("cpu"), torch.float32)
    _, want, _ = generate_one(eager, cfg, "a red circle moves left on a dark background", seed=5)
    compiled_cfg = make_cfg("prompt=x", "progress=false", "sampler.num_steps=3", "compile=true")
    compiled = assemble(compiled_cfg, torch.device("cpu"), torch.float32)
    assert compiled.compiled
    _, got, _ = generate_one(compiled, compiled_cfg, "a red circle moves left on a dark background", seed=5)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, rel


@pytest.mark.slow
def test_compile_with_a_cache_policy_gives_the_eager_result():
    # AdaCache shadows a temporal block's attention tap; a compiled block must not skip it (dynamo
    # reused the graph of an unshadowed block for it: "no residual seen" at step 0).
    overrides = ("prompt=x", "progress=false", "sampler.num_steps=8", "cache=adacache")
    cfg = make_cfg(*overrides)
    eager = assemble(cfg, torch.device("cpu"), torch.float32)
    _, want, _ = generate_one(eager, cfg, "a red circle moves left on a dark background", seed=5)
    want_pattern = eager.policy.report()["pattern"]
    eager.release()
    compiled_cfg = make_cfg(*overrides, "compile=true")
    compiled = assemble(compiled_cfg, torch.device("cpu"), torch.float32)
    _, got, _ = generate_one(compiled, compiled_cfg, "a red circle moves left on a dark background", seed=5)
    assert compiled.policy.report()["pattern"] == want_pattern
    assert "R" in want_pattern  # the test covers reused steps too
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, rel
