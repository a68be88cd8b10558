import pytest
import torch

from runner.sampler import SamplerSettings, guidance, make_timesteps, sample, timestep_transform, transform_ratio


def test_transform_ratio_reference_values():
    # 480p 2s: bf16 width 854 -> 856, ratio about 4.84; 720p 4s about 10.27 (10.25 in bf16).
    assert abs(transform_ratio(480, 854, 51) - 4.84) < 0.01
    assert abs(transform_ratio(480, 854, 51, cond_dtype=torch.float64) - 4.843) < 0.001
    assert abs(transform_ratio(720, 1280, 102) - 10.25) < 1e-6
    assert abs(transform_ratio(720, 1280, 102, cond_dtype=torch.float64) - 10.27) < 0.01


def test_720p_4s_schedule():
    ts = make_timesteps(SamplerSettings(), 720, 1280, 102)
    assert len(ts) == 30 and ts[0] == 1000.0
    # the model sees bf16 timesteps (spacing 4 above 512): the second step is 996
    assert torch.tensor(ts[1]).to(torch.bfloat16).item() == 996.0
    assert [round(t) for t in ts[-6:]] == [719, 672, 612, 532, 423, 261]
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_no_transform_is_linear_and_images_use_one_frame():
    ts = make_timesteps(SamplerSettings(num_steps=4, use_timestep_transform=False), 720, 1280, 102)
    assert ts == [1000.0, 750.0, 500.0, 250.0]
    # num_frames == 1 counts as one frame: ratio_time 1
    assert abs(timestep_transform(500, 512, 512, 1) - 500) < 1e-9


def test_cfg_scale_one_equals_conditional():
    torch.manual_seed(0)
    z0 = torch.randn(1, 4, 2, 4, 4)
    w = torch.randn(2, 4, 1, 1, 1)

    def model_fn(z_in, t_in, info):  # cond half and uncond half differ
        return torch.cat([z_in * w, z_in], 1) * (t_in[:, None, None, None, None] / 1000)

    s = SamplerSettings(num_steps=5, cfg_scale=1.0, use_timestep_transform=False)
    ts = make_timesteps(s, 64, 64, 1)
    z_cfg = sample(model_fn, z0, s, ts, latent_channels=4)

    def cond_only(z_in, t_in, info):
        return torch.cat([z_in * w[:1], z_in], 1) * (t_in[:, None, None, None, None] / 1000)

    z = z0.clone()
    for i, t in enumerate(ts):
        v = cond_only(z, torch.full((1,), t), None)[:, :4]
        z = z + v * (t - (ts[i + 1] if i + 1 < len(ts) else 0.0)) / 1000
    torch.testing.assert_close(z_cfg, z)


def test_euler_integrates_full_interval_and_reports_steps():
    z0 = torch.zeros(1, 4, 1, 2, 2)
    v = torch.randn(1, 4, 1, 2, 2)
    seen = []
    s = SamplerSettings(num_steps=7, cfg_scale=3.0)
    ts = make_timesteps(s, 720, 1280, 102)
    out = sample(lambda z, t, info: (seen.append(info.index), v.repeat(2, 2, 1, 1, 1))[1], z0, s, ts, 4,
                 on_step=lambda i, ph: seen.append((i, ph)))
    # constant velocity: the dt's sum to exactly 1
    torch.testing.assert_close(out, v)
    assert [x for x in seen if isinstance(x, int)] == list(range(7))
    assert seen[:3] == [(0, "start"), 0, (0, "end")]


def test_guidance_formula():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert guidance(c, u, 7.0).item() == 8.0


def test_fixed_timestep_shift_replaces_the_size_dependent_transform():
    # tau' = 3 tau / (1 + 2 tau): 0.75 -> 0.9, 0.5 -> 0.75, 0.25 -> 0.5, whatever the video size
    for size in ((32, 32, 8), (720, 1280, 102)):
        ts = make_timesteps(SamplerSettings(num_steps=4, timestep_shift=3.0), *size)
        assert [round(t, 9) for t in ts] == [1000.0, 900.0, 750.0, 500.0]
    assert make_timesteps(SamplerSettings(num_steps=4, timestep_shift=1.0), 720, 1280, 102) == [1000.0, 750.0, 500.0, 250.0]
    with pytest.raises(ValueError, match="timestep_shift"):
        make_timesteps(SamplerSettings(num_steps=4, timestep_shift=0.0), 32, 32, 8)


def test_non_finite_latent_stops_after_the_first_step():
    calls = []

    def model_fn(z, t, info):
        calls.append(info.index)
        return torch.full_like(z, float("nan"))

    with pytest.raises(FloatingPointError, match="after step 1 of 30"):
        sample(model_fn, torch.zeros(1, 3, 2, 4, 4), SamplerSettings(num_steps=30), list(range(1000, 0, -33))[:30], 3)
    assert calls == [0]  # not after every step
