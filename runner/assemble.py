"""The one place where a job's parts meet, in this order (DESIGN principle 2):

1. build the model on the meta device and load its weights (runner.families.build_pipeline;
   random weights are drawn on the device instead when no checkpoint is given);
2. apply the parallel layout (`Parallel.apply_layout`: parallel/layouts.py's hooks around the
   attention, installed on the built model, whose collectives go through the counted comm);
3. install the cache policy (`cfg.cache.build(comm)`, then `policy.install`) outside the layout,
   so that a reused stage never enters a wrapped collective;
4. optionally `torch.compile` the blocks (`compile=true`), last, over everything installed.

`assemble` returns the `Job`: the pipeline, the parallel job (mesh and counted comm), the layout and
the policy. Whatever needs one of them gets it from the job; nothing is looked up elsewhere.
`Job.denoise` is the model call of every sampling step:

    e = dit.embed(x, t, y, mask, ...)        # patchify, positions, timestep and caption
    h = policy.blocks(e, step)               # the policy decides, then runs or reuses the blocks
    return dit.final(h, e)                   # final layer
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.layouts import SequenceParallel
from runner.cache import CachePolicy, forward
from runner.config import Config
from runner.distributed import Parallel, local
from runner.families import build_pipeline


@dataclass
class Job:
    pipe: object  # runner.families: DemoPipeline or OpenSoraPipeline
    par: Parallel
    layout: SequenceParallel | None
    policy: CachePolicy
    compiled: bool = False

    @property
    def dit(self):
        return self.pipe.dit

    def denoise(self, x, t, y, mask, step, **kwargs) -> torch.Tensor:
        """One model call of the sampler for `step` (runner.sampler.StepInfo)."""
        return forward(self.pipe.dit, self.policy, step, x, t, y, mask, **kwargs)

    def release(self) -> None:
        """Take the policy and the layout off the model (the model itself stays loaded)."""
        self.policy.uninstall()
        if self.layout is not None:
            self.layout.remove()
            self.layout = self.par.layout = None


def compile_blocks(dit) -> int:
    """torch.compile the blocks in place (Module.compile keeps the module, its hooks and its
    state-dict names); embed and the final layer are cheap and stay eager. -> blocks compiled.

    A block where a cache policy shadows a submodule on the instance (runner/cache/branches.py)
    stays eager: dynamo's guards do not see instance-dict shadows (torch 2.13), so a graph traced
    on a plain block would be reused for it and skip its taps."""
    n = 0
    for block in [*dit.spatial_blocks, *dit.temporal_blocks]:
        if not any(name in block.__dict__ for name in block._modules):
            block.compile()
            n += 1
    return n


def assemble(cfg: Config, device: torch.device | None = None, dtype: torch.dtype | None = None,
             par: Parallel | None = None, pipe=None) -> Job:
    """The job's parts, in the documented order, on `device` in `dtype`. `pipe`: an already loaded
    pipeline to reuse instead of step 1 (evaluations that run several cache policies on one model;
    release the previous job first). `par`: the job's parallel setup (default: one process)."""
    par = par or local()
    if pipe is None:
        pipe = build_pipeline(cfg.model, device, dtype)  # 1. build on the meta device, load
    layout = par.apply_layout(pipe, cfg)  # 2. the parallel layout
    policy = cfg.cache.build(par.comm)  # 3. the cache policy, outside the layout
    policy.install(pipe.dit)
    if cfg.compile:  # 4. compile, last
        compile_blocks(pipe.dit)
    return Job(pipe, par, layout, policy, compiled=cfg.compile)
