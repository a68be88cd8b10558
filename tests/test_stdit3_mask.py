"""STDiT3's x_mask (Open-Sora 1.2's reference-frame conditioning): frames whose mask is False take
timestep 0's modulation (t0) in every block and in the final layer. Without a mask nothing changes;
the mask only touches what it should; sharded runs (DSP, Ulysses, CFG-parallel) equal one process.

(The comparison with Open-Sora 1.2's own STDiT3 on one shared state dict is run outside the repo.)
"""

import pytest
import torch

from dist_util import run_dist
from models.layers import modulate
from models.stdit3 import build_stdit3, get_config
from parallel.comm import Comm
from parallel.layouts import parallelize
from parallel.mesh import ParallelConfig, init_mesh

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = get_config("STDiT3-tiny")  # depth 2, hidden 64, 4 heads, patch (1, 2, 2)
SIZE = (5, 9, 10)  # latent T, H, W: 5 frames, 5 patch rows (the last one half), 5 patch columns
# one row per prompt: prompt 0 given its first frame (image-to-video), prompt 1 its first two and last
X_MASK = torch.tensor([[False, True, True, True, True], [False, False, True, True, False]])


def _model(dtype=torch.float32):
    model = build_stdit3(TINY, seed=0, dtype=dtype)
    with torch.no_grad():  # the init zeroes the temporal branches: make every path count
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name != "rope.freqs":
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(dtype))
    return model.eval()


def _inputs(batch=4, size=SIZE, seed=0):
    """[cond; null] for batch // 2 prompts: latent, timestep, captions, text mask (one row per prompt)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, *size, generator=g)
    y = torch.randn(batch, 7, TINY.caption_channels, generator=g)
    mask = torch.ones(batch // 2, 7)
    mask[:, 5:] = 0
    return z, torch.full((batch,), 700.0), y, mask


# ----------------------------------------------------------------------------- single device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_mask_and_an_all_true_mask_leave_the_output_unchanged(dtype):
    model = _model(dtype)
    z, t, y, mask = _inputs()
    with torch.no_grad():
        plain = model(z, t, y, mask)
        e = model.embed(z, t, y, mask)
        all_true = model(z, t, y, mask, x_mask=torch.ones(2, SIZE[0], dtype=torch.bool))
    assert e.x_mask is None and e.t0 is None and e.t_mlp.shape == (4, 6 * TINY.hidden_size)
    assert torch.equal(all_true, plain)  # the mask path picks t's values everywhere, bit for bit


def test_t0_is_the_modulation_of_timestep_0_per_frame():
    model = _model()
    z, t, y, mask = _inputs()
    kw = dict(fps=12.0)  # t0 keeps the fps embedding
    with torch.no_grad():
        e = model.embed(z, t, y, mask, x_mask=X_MASK, **kw)
        at_t = model.embed(z, t, y, mask, **kw)
        at_0 = model.embed(z, torch.zeros(4), y, mask, **kw)
    rows = X_MASK.repeat(2, 1)  # both CFG halves of a prompt share its row, as Open-Sora's repeat(2, 1)
    assert torch.equal(e.x_mask, rows)
    assert torch.equal(e.t0, at_0.t) and torch.equal(e.t, at_t.t)
    assert e.t_mlp.shape == (4, SIZE[0], 6 * TINY.hidden_size)
    for b in range(4):
        for f in range(SIZE[0]):
            want = at_t.t_mlp[b] if rows[b, f] else at_0.t_mlp[b]
            assert torch.equal(e.t_mlp[b, f], want), (b, f)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_a_block_modulates_given_frames_with_t0(kind):
    model = _model()
    z, t, y, mask = _inputs()
    with torch.no_grad():
        e = model.embed(z, t, y, mask, x_mask=X_MASK)
        e_t, e_0 = model.embed(z, t, y, mask), model.embed(z, torch.zeros(4), y, mask)
        block = getattr(model, f"{kind}_blocks")[1]
        run = lambda t_mlp: block(e.x, e.y, e.y_mask, t_mlp)  # noqa: E731
        masked, with_t, with_t0 = run(e.t_mlp), run(e_t.t_mlp), run(e_0.t_mlp)
        all_given = run(torch.where(torch.zeros(4, SIZE[0], 1, dtype=torch.bool), e.t_mlp, e_0.t_mlp[:, None]))
    given = ~e.x_mask
    assert (masked[given] - with_t[given]).abs().max() > 1e-2  # t0 is applied: the given frames changed
    assert torch.equal(all_given, with_t0)  # every frame given: exactly a run at timestep 0
    if kind == "spatial":  # frames do not mix: each frame is exactly its own timestep's run
        torch.testing.assert_close(masked[given], with_t0[given], rtol=0, atol=1e-6)
        torch.testing.assert_close(masked[~given], with_t[~given], rtol=0, atol=1e-6)


def test_final_layer_conditions_given_frames_as_open_sora_does():
    model = _model()
    z, t, y, mask = _inputs()
    fl = model.final_layer
    with torch.no_grad():
        e = model.embed(z, t, y, mask, x_mask=X_MASK)
        h = torch.randn_like(e.x)
        out = fl(h, e.t, e.x_mask, e.t0)
        c = h.shape[-1]
        shift, scale = (fl.scale_shift_table[None] + e.t[:, None]).reshape(4, 2, 1, 1, c).unbind(1)
        shift0, scale0 = (fl.scale_shift_table[None] + e.t0[:, None]).reshape(4, 2, 1, 1, c).unbind(1)
        with_t = modulate(fl.norm_final(h), shift, scale)
        # Open-Sora 1.2 normalises the t-modulated tokens again for the t0 branch (not h itself)
        with_t0 = modulate(fl.norm_final(with_t), shift0, scale0)
    given = ~e.x_mask
    torch.testing.assert_close(out[given], fl.linear(with_t0)[given], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[~given], fl.linear(with_t)[~given], rtol=0, atol=1e-6)


def test_the_mask_changes_only_what_it_should():
    model = _model()
    z, t, y, mask = _inputs()
    with torch.no_grad():
        # At timestep 0, t0 is t: the blocks' output is the unmasked one, bit for bit.
        zero = torch.zeros(4)
        assert torch.equal(model.blocks(model.embed(z, zero, y, mask, x_mask=X_MASK)),
                           model.blocks(model.embed(z, zero, y, mask)))
        plain, masked = model(z, t, y, mask), model(z, t, y, mask, x_mask=X_MASK)
        # Each sample follows its own row: a sample alone with its row gives its slice of the batch.
        for b in range(4):
            alone = model(z[b:b + 1], t[:1], y[b:b + 1], mask[b % 2:b % 2 + 1], x_mask=X_MASK[b % 2:b % 2 + 1])
            torch.testing.assert_close(alone[0], masked[b], rtol=0, atol=1e-5)
    assert (masked - plain).abs().amax(dim=(1, 3, 4)).min() > 1e-3  # every frame feels it (temporal attention)


def test_x_mask_shape_is_checked():
    model = _model()
    z, t, y, mask = _inputs()
    with pytest.raises(ValueError, match=r"x_mask must be \(rows, 5\) .* got \(2, 4\)"):
        model(z, t, y, mask, x_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rows dividing the batch of 4 .* got \(3, 5\)"):
        model(z, t, y, mask, x_mask=torch.ones(3, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------- sharded, real ranks


def _sharded_masked_forward(rank, world, layout, size, cfg):
    """This rank's band (and CFG half, with cfg=2) of a masked forward against one process's."""
    sp = world // cfg
    mesh = init_mesh(ParallelConfig(cfg=cfg, sp=sp, timeout_s=30))
    comm = Comm(mesh)
    model = _model()
    z, t, y, mask = _inputs(4, size)
    x_mask = X_MASK[:, : size[0]].clone()
    if size[0] > 2:
        x_mask[:, -1] = False  # given frames in the first and the last rank's time shard
    hw = dict(height=size[1] * 8, width=size[2] * 8)
    with torch.no_grad():
        ref = model(z, t, y, mask, x_mask=x_mask, **hw)
        if cfg == 2:  # as runner/distributed.py ShardedRun: the same noise, this rank's caption half
            z, t, y = z.chunk(2)[mesh.cfg_rank], t.chunk(2)[mesh.cfg_rank], y.chunk(2)[mesh.cfg_rank]
            ref = ref.chunk(2)[mesh.cfg_rank]
        layout = parallelize(model, mesh, comm, layout)
        shard = layout.shard(z.shape)
        band = model(shard.slice(z), t, y, mask, rows=shard.rows, x_mask=x_mask, **hw)
        full = shard.assemble(band, comm) if sp > 1 else band
    return (full - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("layout,world,cfg,size", [
    ("dsp", 2, 1, SIZE),
    ("dsp", 3, 1, SIZE),        # uneven rows (2, 2, 1) and frames (2, 2, 1)
    ("dsp", 3, 1, (2, 9, 10)),  # T = 2 < p = 3: one rank holds no frames during spatial attention
    ("ulysses", 2, 1, SIZE),
    ("dsp", 2, 2, SIZE),        # cfg = 2 alone
    ("dsp", 4, 2, SIZE),        # cfg = 2 x DSP sp = 2
])
def test_sharded_masked_forward_equals_one_process(layout, world, cfg, size):
    for diff in run_dist(_sharded_masked_forward, world, layout, size, cfg):
        assert diff <= 1e-5, diff
