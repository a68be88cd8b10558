"""Distributed decoding (issue 6): the ranks of a prompt's group decode different VAE chunks and
one all_gather assembles the frames; the video equals the single-process decode."""

import pytest
import torch

pytest.importorskip("diffusers")

from dist_util import run_dist  # noqa: E402
from runner.distributed import Parallel, local  # noqa: E402


class VAEPipe:
    """The decode side of the Open-Sora pipeline around a tiny published-layout VAE."""

    def __init__(self):
        from runner.families.opensora import OpenSoraPipeline
        from tests.opensora_util import tiny_vae

        self.vae = tiny_vae().eval()
        for name in ("chunks", "decode_chunks", "decode", "frame_size"):
            setattr(self, name, getattr(OpenSoraPipeline, name).__get__(self))


def _latent(frames):
    pipe = VAEPipe()
    t, h, w = pipe.vae.latent_size(frames, 24, 16)
    return pipe, torch.randn((1, 4, t, h, w), generator=torch.Generator().manual_seed(frames))


def _decode(rank, world, frames):
    from parallel.comm import Comm
    from parallel.mesh import ParallelConfig, init_mesh

    torch.set_num_threads(1)
    mesh = init_mesh(ParallelConfig(sp=-1, timeout_s=60))
    par = Parallel(mesh, Comm(mesh))
    pipe, z = _latent(frames)
    with torch.no_grad():
        video = par.decode(pipe, z, frames)
    return video, [(e.op, e.group, e.phase) for e in par.comm.log.events]


@pytest.mark.parametrize("world", [2, 3])
def test_decode_shared_by_2_and_3_ranks_equals_one_process(world):
    frames = 51  # 15 latent frames: 3 chunks, so 3 ranks take one each and 2 ranks split 2 + 1
    pipe, z = _latent(frames)
    with torch.no_grad():
        ref = local().decode(pipe, z, frames)
    assert ref.shape == (1, 3, frames, 24, 16)
    results = run_dist(_decode, world, frames, timeout=120)
    for video, events in results:
        # Chunks are independent; only float summation order (batch size, threads) may differ.
        assert video.shape == ref.shape and (video - ref).abs().max().item() <= 1e-5
        assert events == [("all_gather", "agree", "decode")]  # the frames move once


def test_more_ranks_than_chunks():
    frames = 17  # 5 latent frames: one chunk, the second rank decodes nothing
    pipe, z = _latent(frames)
    with torch.no_grad():
        ref = local().decode(pipe, z, frames)
    for video, _ in run_dist(_decode, 2, frames, timeout=120):
        assert video.shape == ref.shape and (video - ref).abs().max().item() <= 1e-5
