"""The timestep grid and σ_t against diffusers and the closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pipeline.diffusion.ddim_step import posterior_sample
from pipeline.diffusion.schedule import ddim_sigma, dynamic_threshold, schedule_from_scheduler


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_full_grid_is_the_schedulers_own(spacing, steps):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched = schedule_from_scheduler(ref)
    ref.set_timesteps(steps)
    assert sched.grid(steps) == [int(t) for t in ref.timesteps]


@pytest.mark.parametrize("steps,strength", [(50, 0.8), (50, 0.01), (10, 1.0), (7, 0.5), (3, 0.34)])
def test_strength_keeps_the_last_steps_like_img2img(steps, strength):
    sched = schedule_from_scheduler(DDPMScheduler())
    full = sched.grid(steps)
    cut = sched.grid(steps, strength)
    keep = max(1, int(steps * strength))
    assert cut == full[-keep:]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_strength_out_of_range(bad):
    with pytest.raises(ValueError, match="strength"):
        schedule_from_scheduler(DDPMScheduler()).grid(10, bad)


def test_sigma_matches_ddim_eq16_and_diffusers_variance():
    ref = DDIMScheduler()
    ref.set_timesteps(10)
    a = ref.alphas_cumprod
    for t, p in [(900, 800), (500, 400), (100, 0)]:
        expected = 0.7 * math.sqrt(float(ref._get_variance(t, p)))
        assert ddim_sigma(0.7, float(a[t]), float(a[p])) == pytest.approx(expected, rel=1e-6)


def test_posterior_sample_has_ddim_eq7_moments():
    """x_p | x_t, x0 ~ N(√ᾱ_p x0 + c2 (x_t − √ᾱ_t x0)/√(1−ᾱ_t), σ²): check mean and std on 200k draws."""
    a_t, a_p, eta = 0.3, 0.6, 0.8
    sigma = ddim_sigma(eta, a_t, a_p)
    x0, x_t = torch.tensor(0.4, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    n = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = posterior_sample(x0, x_t, a_t, a_p, sigma, n)
    c2 = math.sqrt(1 - a_p - sigma**2)
    mean = math.sqrt(a_p) * 0.4 + c2 * (-0.7 - math.sqrt(a_t) * 0.4) / math.sqrt(1 - a_t)
    assert draws.mean().item() == pytest.approx(mean, abs=4 * sigma / math.sqrt(200_000))
    assert draws.std().item() == pytest.approx(sigma, rel=0.01)


def test_dynamic_threshold_matches_diffusers():
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(dynamic_threshold(x, 0.9, 2.0), ref._threshold_sample(x), atol=1e-6)


def test_timesteps_outside_the_table_are_a_clear_error():
    sched = schedule_from_scheduler(DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="same noise schedule"):
        sched.steps_along([500, 0])


def test_clip_x0_modes_apply_or_drop_the_schedulers_clipping():
    sched = schedule_from_scheduler(DDPMScheduler(clip_sample=True, clip_sample_range=1.0))
    x = torch.linspace(-3, 3, 13).view(1, 13)
    assert torch.equal(sched.with_x0_clip("auto").process_x0(x), x.clamp(-1, 1))  # the config clips
    assert torch.equal(sched.with_x0_clip("off").process_x0(x), x)
    unclipped = schedule_from_scheduler(DDPMScheduler(clip_sample=False))
    assert torch.equal(unclipped.with_x0_clip("auto").process_x0(x), x)
    assert torch.equal(unclipped.with_x0_clip("on").process_x0(x), x.clamp(-1, 1))
    thresholding = schedule_from_scheduler(DDPMScheduler(thresholding=True, sample_max_value=2.0))
    assert torch.equal(thresholding.with_x0_clip("off").process_x0(x), x)
    with pytest.raises(ValueError, match="auto, on or off"):
        sched.with_x0_clip("sometimes")


@pytest.mark.parametrize("clip_x0,clip_sample", [("auto", True), ("off", False)])
def test_ddim_decoding_follows_diffusers_with_and_without_clipping(pixel_model, clip_x0, clip_sample):
    """Issue 12.3: "off" is diffusers' DDIM with clip_sample=False (the official code's x0_t);
    the tiny model's x̂0 leaves [-1, 1] at t ≈ 900, so the two modes really differ there."""
    from pipeline.diffusion import ddim_decode_model_space, load_denoiser
    from pipeline.diffusion.latent import Latent

    den = load_denoiser(str(pixel_model))
    den.schedule = den.schedule.with_x0_clip(clip_x0)
    grid = den.schedule.grid_from(900, 10)
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = Latent(x_t, x_t.new_zeros((2, 0, 3, 16, 16)), grid, method="ddim")
    ours = ddim_decode_model_space(den, z)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=clip_sample)
    ref.set_timesteps(10)
    x = x_t.clone()
    with torch.no_grad():
        for t in grid:
            x = ref.step(den.unet(x, torch.tensor([t, t])).sample, t, x, eta=0.0).prev_sample
    assert (ours - x).abs().max().item() < 1e-4
    other = den.schedule.with_x0_clip("off" if clip_x0 == "auto" else "on")
    den.schedule = other
    assert (ddim_decode_model_space(den, z) - ours).abs().max().item() > 1e-3


def test_stages_load_models_with_the_samplers_clip_x0(pixel_model):
    from pipeline.config import ModelConfig, validate
    from pipeline.stages.base import load_model

    assert load_model(ModelConfig(model=str(pixel_model)), "float32").schedule.clip_sample  # its config clips
    off = load_model(ModelConfig(model=str(pixel_model)), "float32", "off").schedule
    assert not off.clip_sample and not off.thresholding
    assert validate({"sampler": {"clip_x0": "off"}}).sampler.clip_x0 == "off"
    with pytest.raises(Exception, match="clip_x0"):
        validate({"sampler": {"clip_x0": True}})
