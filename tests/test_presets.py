"""Resolution / aspect-ratio / duration presets and the bf16 conditioning values."""

import pytest

from models.vae import latent_size
from runner.presets import (
    ASPECT_RATIOS,
    RESOLUTIONS,
    bf16_round,
    image_size,
    num_frames,
)


def test_h_w_convention_9_16_is_landscape():
    assert image_size("720p", "9:16") == (720, 1280)
    assert image_size("480p", "9:16") == (480, 854)
    assert image_size("360p", "9:16") == (360, 640)
    assert image_size("240p", "9:16") == (240, 426)
    assert image_size("144p", "9:16") == (144, 256)
    assert image_size("1080p", "9:16") == (1080, 1920)
    assert image_size("720p", "16:9") == (1280, 720)
    assert [image_size(r, "1:1") for r in ("720p", "480p", "360p", "240p")] == [
        (960, 960), (640, 640), (480, 480), (320, 320)
    ]
    assert image_size("720p", "3:4") == (832, 1110)
    assert image_size("720p", "4:3") == (1108, 832)


def test_every_table_has_every_ratio():
    assert set(RESOLUTIONS) == {"144p", "240p", "360p", "480p", "720p", "1080p"}
    for res in RESOLUTIONS:
        for ar in ASPECT_RATIOS:
            h, w = image_size(res, ar)
            assert h > 0 and w > 0


def test_durations():
    assert [num_frames(d) for d in ("2s", "4s", "8s", "16s", "32s")] == [51, 102, 204, 408, 816]
    assert num_frames("1x") == 51 and num_frames("2x") == 102
    assert num_frames(68) == 68 and num_frames("34") == 34


def test_latent_sizes_of_presets():
    assert latent_size(num_frames("4s"), *image_size("720p", "9:16")) == (30, 90, 160)
    t, h, w = latent_size(num_frames("2s"), *image_size("480p", "9:16"))
    assert (t, h, w) == (15, 60, 106)
    assert (8 * h, 8 * w) == (480, 848)  # the decoded video is 848 wide
    assert latent_size(51, *image_size("360p", "9:16")) == (15, 45, 80)
    assert latent_size(51, *image_size("240p", "9:16")) == (15, 30, 53)


def test_bf16_round():
    assert bf16_round(854) == 856
    assert bf16_round(426) == 426 and bf16_round(1280) == 1280 and bf16_round(720) == 720
    assert bf16_round(24) == 24 and bf16_round(120) == 120
    assert bf16_round(257) == 256  # tie -> even
    assert bf16_round(259) == 260
    assert bf16_round(480 / 854) == 0.5625
    torch = pytest.importorskip("torch")
    for v in (854, 426, 0.1, 3.85, 1e-3, 12345.678, 480 / 854):
        assert bf16_round(v) == torch.tensor(v, dtype=torch.bfloat16).item()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: image_size("4k", "9:16"), "144p, 240p, 360p, 480p, 720p, 1080p"),
        (lambda: image_size("720p", "16:10"), "9:16"),
        (lambda: num_frames("3s"), "2s"),
        (lambda: num_frames(0), ">= 1"),
        (lambda: image_size("720", "9:16"), "unknown resolution"),
        (lambda: bf16_round(float("nan")), "finite"),
    ],
)
def test_unknown_names_raise_value_error_listing_valid_ones(call, match):
    with pytest.raises(ValueError, match=match):
        call()
