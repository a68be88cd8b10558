"""Open-Sora 1.2 VAE: published key layout, strict local loading, chunked encode/decode."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from models.loading import CheckpointError  # noqa: E402
from models.vae import (  # noqa: E402
    HF_REPO,
    OpenSoraVAE,
    chunk_frame_counts,
    latent_size,
)
from models.vae_temporal import TemporalVAE, TemporalVAEConfig  # noqa: E402
from tests.opensora_util import PUBLISHED_CONFIG, TINY_SPATIAL, TINY_TEMPORAL, save_hf_layout, tiny_vae  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def vae_dir(vae, tmp_path_factory):
    return save_hf_layout(vae, tmp_path_factory.mktemp("vae"))


def test_published_key_layout_full_size():
    with torch.device("meta"):
        full = OpenSoraVAE()
    sd = full.state_dict()
    # a sample of keys and shapes of the published model.safetensors
    expected = {
        "scale": (1, 4, 1, 1, 1),
        "shift": (1, 4, 1, 1, 1),
        "spatial_vae.module.encoder.conv_in.weight": (128, 3, 3, 3),
        "spatial_vae.module.encoder.conv_out.weight": (8, 512, 3, 3),
        "spatial_vae.module.decoder.conv_in.weight": (512, 4, 3, 3),
        "spatial_vae.module.quant_conv.weight": (8, 8, 1, 1),
        "spatial_vae.module.post_quant_conv.weight": (4, 4, 1, 1),
        "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
        "temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight": (256, 128, 1, 1, 1),
        "temporal_vae.encoder.block_res_blocks.3.0.conv1.conv.weight": (512, 256, 3, 3, 3),
        "temporal_vae.encoder.conv_blocks.1.conv.weight": (256, 256, 3, 3, 3),
        "temporal_vae.encoder.conv_blocks.2.conv.bias": (256,),
        "temporal_vae.encoder.conv2.conv.weight": (8, 512, 1, 1, 1),
        "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
        "temporal_vae.post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
        "temporal_vae.decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
        "temporal_vae.decoder.res_blocks.3.conv2.conv.weight": (512, 512, 3, 3, 3),
        "temporal_vae.decoder.block_res_blocks.0.0.conv1.conv.weight": (128, 256, 3, 3, 3),
        "temporal_vae.decoder.block_res_blocks.0.0.conv3.conv.weight": (128, 256, 1, 1, 1),
        "temporal_vae.decoder.block_res_blocks.2.0.conv3.conv.weight": (256, 512, 1, 1, 1),
        "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
        "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # bias-free convs (ResBlocks, encoder conv_in) and parameter-free Identity at conv_blocks.0
    assert "temporal_vae.encoder.conv_in.conv.bias" not in sd
    assert "temporal_vae.decoder.res_blocks.0.conv1.conv.bias" not in sd
    assert not any(".conv_blocks.0." in k for k in sd)
    temporal_convs = [k for k in sd if k.startswith("temporal_vae.") and "norm" not in k]
    assert len(temporal_convs) == 103
    assert len(sd) == 517
    assert sum(p.numel() for p in full.temporal_vae.parameters()) == 309_687_144
    assert sum(p.numel() for p in full.spatial_vae.parameters()) == 83_653_863


def test_parameter_count_helper():
    from models.param_count import opensora_vae_param_counts

    counts = opensora_vae_param_counts()
    assert counts["total"] == 393_341_007  # 1.57 GB in fp32, the size of the published file
    assert counts["buffers"] == 8  # scale and shift


def test_from_pretrained_loads_strictly(vae, vae_dir):
    loaded = OpenSoraVAE.from_pretrained(vae_dir, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL)
    ref = vae.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert loaded.micro_frame_size == 17 and loaded.spatial_vae.micro_batch_size == 4
    assert not any(p.requires_grad for p in loaded.parameters())


def test_from_pretrained_dtype(vae_dir):
    loaded = OpenSoraVAE.from_pretrained(
        vae_dir, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL, dtype=torch.bfloat16
    )
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.scale.dtype == torch.bfloat16  # as Open-Sora's vae.to(bf16)


def test_missing_files_error(tmp_path):
    with pytest.raises(CheckpointError) as err:
        OpenSoraVAE.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "config.json" in msg and "model.safetensors" in msg
    assert f"huggingface-cli download {HF_REPO} --local-dir {tmp_path}" in msg


def test_mismatched_key_error(vae, tmp_path):
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    sd["temporal_vae.decoder.conv_out.weight"] = sd.pop("temporal_vae.decoder.conv_out.conv.weight")
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    safetensors_torch.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        OpenSoraVAE.from_pretrained(tmp_path, spatial_config=TINY_SPATIAL, temporal_config=TINY_TEMPORAL)
    msg = str(err.value)
    assert "missing keys: temporal_vae.decoder.conv_out.conv.weight" in msg
    assert "unexpected keys: temporal_vae.decoder.conv_out.weight" in msg


def test_wrong_width_error(vae_dir):
    wider = TemporalVAEConfig(filters=16, num_res_blocks=2, num_groups=4)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        OpenSoraVAE.from_pretrained(vae_dir, spatial_config=TINY_SPATIAL, temporal_config=wider)


@pytest.mark.parametrize("frames,latent", [(51, 15), (102, 30)])
def test_encode_decode_round_trip_shapes(vae, frames, latent):
    x = torch.rand(1, 3, frames, 8, 8) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, 4, latent, 1, 1)
    assert vae.latent_size(frames, 8, 8) == (latent, 1, 1)
    y = vae.decode(z, frames)
    assert y.shape == (1, 3, frames, 8, 8)
    assert torch.isfinite(y).all()


def test_chunk_plan_and_independence(vae):
    plan = vae.chunks(51)
    assert [(c.latent_start, c.latent_stop, c.frame_start, c.frame_stop) for c in plan] == [
        (0, 5, 0, 17), (5, 10, 17, 34), (10, 15, 34, 51)
    ]
    torch.manual_seed(1)
    z = torch.randn(2, 4, 15, 1, 2)
    full = vae.decode(z, 51)
    for c in plan:
        alone = vae.decode_chunks(z, 51, [c.index])
        torch.testing.assert_close(alone, full[:, :, c.frame_start:c.frame_stop], rtol=1e-5, atol=1e-5)
    # a chunk decodes from its own latents only
    z2 = z.clone()
    z2[:, :, 0:5] = torch.randn(2, 4, 5, 1, 2)
    torch.testing.assert_close(vae.decode_chunks(z2, 51, [2, 1]), torch.cat([full[:, :, 34:], full[:, :, 17:34]], 2))


def test_partial_last_chunk(vae):
    # 40 frames = 17 + 17 + 6 -> 5 + 5 + 2 latents; the last chunk drops 2 padded frames
    assert chunk_frame_counts(40) == [17, 17, 6]
    assert [c.num_frames for c in vae.chunks(40)] == [17, 17, 6]
    x = torch.rand(1, 3, 40, 8, 8) * 2 - 1
    z = vae.encode(x)
    assert z.shape[2] == 12
    assert vae.decode(z, 40).shape[2] == 40
    with pytest.raises(ValueError, match="latent frames"):
        vae.decode(z, 51)
    with pytest.raises(ValueError, match="out of range"):
        vae.decode_chunks(z, 40, [3])


def test_encode_is_chunked_normalised_mean(vae):
    x = torch.rand(1, 3, 34, 8, 8) * 2 - 1
    z = vae.encode(x)
    with torch.no_grad():
        x_z = vae.spatial_vae.encode(x)
        means = [vae.temporal_vae.encode(x_z[:, :, s:s + 17]).mean for s in (0, 17)]
    expected = (torch.cat(means, 2) - vae.shift) / vae.scale
    torch.testing.assert_close(z, expected)
    assert vae.shift.flatten().tolist() == pytest.approx([-0.10, 0.34, 0.27, 0.98])
    assert vae.scale.flatten().tolist() == pytest.approx([3.85, 2.32, 2.33, 3.06])


def test_temporal_vae_pads_in_front_with_zeros():
    torch.manual_seed(0)
    tv = TemporalVAE(TINY_TEMPORAL).eval()
    assert tv.front_padding(17) == 3 and tv.latent_frames(17) == 5 and tv.latent_frames(1) == 1
    x = torch.randn(1, 4, 17, 3, 3)
    with torch.no_grad():
        a = tv.encode(x).mean
        b = tv.encode(torch.cat([torch.zeros(1, 4, 3, 3, 3), x], dim=2)).mean  # 20 frames: no padding
        torch.testing.assert_close(a, b)
        assert a.shape == (1, 4, 5, 3, 3)
        full = tv.decoder(tv.post_quant_conv(a))
        assert full.shape[2] == 20
        torch.testing.assert_close(tv.decode(a, 17), full[:, :, 3:])  # the first 3 frames are dropped


def test_micro_batches_match_one_batch(vae):
    x = torch.rand(2, 3, 6, 8, 8) * 2 - 1
    batched = OpenSoraVAE(TINY_SPATIAL, TINY_TEMPORAL, micro_batch_size=4).eval()
    batched.load_state_dict(vae.state_dict())
    z = vae.encode(x)
    torch.testing.assert_close(batched.encode(x), z)
    torch.testing.assert_close(batched.decode(z, 6), vae.decode(z, 6))


def test_latent_size_of_presets():
    assert latent_size(51, 720, 1280) == (15, 90, 160)
    assert latent_size(102, 480, 854) == (30, 60, 106)
    assert 8 * latent_size(51, 480, 854)[2] == 848  # decoded width at 480p
    assert latent_size(204, 240, 426) == (60, 30, 53)
