"""Helpers for the cache-policy tests: a tiny STDiT3 whose temporal branches are not zero (the
default init zeroes them, which makes the t-attn metric residual identically zero), a fixed input,
and a sampling run with a policy."""

from __future__ import annotations

import dataclasses
import json

import torch

from models.stdit3 import build_stdit3, get_config
from runner.cache import AdaCacheConfig, forward
from runner.sampler import SamplerSettings, guidance, sample

STEPS = 30


def tiny_model(seed: int = 0, depth: int = 2):
    m = build_stdit3(get_config("STDiT3-tiny", depth=depth), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for blk in m.temporal_blocks:
            for lin in (blk.attn.proj, blk.cross_attn.proj, blk.mlp.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return m


def inputs(seed: int = 1, frames: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 16, 32, generator=g)  # [cond; null] captions
    mask = torch.ones(1, 16)
    z = torch.randn(1, 4, frames, size, size, generator=g)
    return z, y, mask


def cache_cfg(**kw) -> AdaCacheConfig:
    return dataclasses.replace(AdaCacheConfig(), **kw)


def timesteps(n: int = STEPS) -> list[float]:
    return [1000.0 * (1 - i / n) for i in range(n)]


@torch.no_grad()
def run(model, policy, z, y, mask, n: int = STEPS, cfg_combine=None, batch_slice=None, ts=None):
    """Sample n steps with policy (None: no cache). batch_slice: which CFG half this rank computes.
    ts: the timesteps (default: linear from 1000)."""

    def model_fn(z_in, t_in, step):
        yy = y if batch_slice is None else y[batch_slice]
        if policy is None:
            return model(z_in, t_in, yy, mask)
        return forward(model, policy, step, z_in, t_in, yy, mask)

    return sample(model_fn, z, SamplerSettings(num_steps=n, use_timestep_transform=False), ts or timesteps(n), 4,
                  cfg_combine=cfg_combine)


FRAMES, SIZE = 5, 10  # latent 5 x 10 x 10: 5 patch rows and 5 token frames, uneven for p = 2, 3, 4


@torch.no_grad()
def sharded_run(rank, world_size, sp, cfg_size, layout, cache, ts=None, depth: int = 2):
    """One cached generation on a gloo mesh (cfg x sp) under a sequence-parallel layout, the policy
    installed outside it: (assembled output, policy report, collectives per step)."""
    from parallel.comm import Comm
    from parallel.layouts import parallelize
    from parallel.mesh import ParallelConfig, init_mesh

    mesh = init_mesh(ParallelConfig(cfg=cfg_size, sp=sp, timeout_s=30))
    comm = Comm(mesh)
    model = tiny_model(depth=depth)
    z, y, mask = inputs(frames=FRAMES, size=SIZE)
    par = parallelize(model, mesh, comm, layout)  # the layout first, the cache outside it
    policy = cache.build(comm)
    policy.install(model)
    shard = par.shard(z.shape)
    zb = shard.slice(z).clone()
    yy, cfg_combine = y, None
    if cfg_size == 2:
        yy = y[mesh.cfg_rank:mesh.cfg_rank + 1]

        def cfg_combine(v):
            return guidance(*comm.all_gather(v.contiguous(), "cfg", dim=0, tag="cfg").chunk(2), 7.0)

    def model_fn(z_in, t_in, step):
        comm.log.set_step(step.index)
        # the whole video's size
        return forward(model, policy, step, z_in, t_in, yy, mask, height=SIZE, width=SIZE, rows=shard.rows)

    out = sample(model_fn, zb, SamplerSettings(num_steps=STEPS, use_timestep_transform=False),
                 ts or timesteps(), 4, cfg_combine=cfg_combine)
    comm.log.set_step(None)
    full = shard.assemble(out, comm)
    per_step = json.loads(json.dumps(comm.log.per_step()))
    mesh.destroy()
    return full, policy.report(), per_step

