"""Helpers for the cache-policy tests: a tiny STDiT3 whose temporal branches are not zero (the
default init zeroes them, which makes the t-attn metric residual identically zero), a fixed input,
and a sampling run with a policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.stdit3 import build_stdit3, get_config
from runner.config import CacheConfig
from runner.sampler import SamplerSettings, sample

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


def cache_cfg(**kw) -> CacheConfig:
    return dataclasses.replace(CacheConfig(name="adacache"), **kw)


def timesteps(n: int = STEPS) -> list[float]:
    return [1000.0 * (1 - i / n) for i in range(n)]


@torch.no_grad()
def run(model, policy, z, y, mask, n: int = STEPS, cfg_combine=None, batch_slice=None):
    """Sample n steps with policy (None: no cache). batch_slice: which CFG half this rank computes."""

    def model_fn(z_in, t_in, info):
        yy = y if batch_slice is None else y[batch_slice]
        return model(z_in, t_in, yy, mask)

    fn = model_fn if policy is None else policy.wrap_model_fn(model_fn)
    return sample(fn, z, SamplerSettings(num_steps=n, use_timestep_transform=False), timesteps(n), 4,
                  cfg_combine=cfg_combine)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (the build machines' 2 cores are shared; more threads only spin)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
