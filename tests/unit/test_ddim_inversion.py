"""DDIM inversion: recovers a DDIM sample's starting noise, better with more steps."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import (
    Latent,
    ddim_decode,
    ddim_decode_model_space,
    ddim_invert,
    ddim_invert_model_space,
    load_denoiser,
)


@pytest.fixture(scope="module")
def unclipped_model(models_dir):
    from tiny_models import _scheduler, save_pixel_model

    # clip_sample makes the map many-to-one, so inversion is tested on an unclipped scheduler
    sched = _scheduler("ddim", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return load_denoiser(str(save_pixel_model(models_dir / "unclipped", seed=3, scheduler=sched)))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_inversion_recovers_the_starting_noise_better_with_more_steps(unclipped_model, strength):
    den = unclipped_model
    errors = []
    for steps in (10, 20, 50, 100):
        grid = den.schedule.grid(steps, strength)
        x_start = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        generated = ddim_decode_model_space(den, Latent(x_start, x_start.new_zeros(4, 0, 3, 16, 16), grid, method="ddim"))
        z = ddim_invert_model_space(den, generated, steps=steps, strength=strength)
        assert z.timesteps == grid and z.method == "ddim" and z.noise.shape[1] == 0
        errors.append((z.x_start - x_start).pow(2).mean().sqrt().item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.02, errors


def test_inversion_to_a_named_t0_on_the_grid(unclipped_model):
    den = unclipped_model
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    errors = []
    for steps in (20, 100):  # steps_offset=1: both grids hold 501
        z = ddim_invert(den, x0, steps=steps, t0=501)
        assert z.timesteps[0] == 501 and z.timesteps[-1] == 1
        assert len(z.timesteps) == 1 + 500 // (1000 // steps)
        errors.append((ddim_decode(den, z) - x0).abs().mean().item())
    assert errors[1] < errors[0], errors  # approximate: measured, and shrinking with steps


def test_t0_off_the_grid_snaps_to_the_nearest_as_the_ood_jobs_do(unclipped_model):
    from pipeline.diffusion.ood import ood_grid

    den = unclipped_model
    z = ddim_invert(den, torch.zeros(1, 3, 16, 16), steps=20, t0=500)  # 20 steps, offset 1: …, 451, 501, …
    assert z.timesteps[0] == 501 and z.timesteps == den.schedule.grid(20)[den.schedule.grid(20).index(501):]
    assert ood_grid(den.schedule, 500, 10)[0] == den.schedule.snap(500, 20)  # one policy: the same snap
    with pytest.raises(ValueError, match=r"t0 = 1000 must lie in 0\.\.999"):
        ddim_invert(den, torch.zeros(1, 3, 16, 16), steps=20, t0=1000)


def test_ddim_decode_refuses_a_dpm_latent(unclipped_model):
    from pipeline.diffusion import dpm_encode

    z = dpm_encode(unclipped_model, torch.zeros(1, 3, 16, 16), steps=4, eta=0.5)
    with pytest.raises(ValueError, match="use dpm_decode"):
        ddim_decode(unclipped_model, z)
