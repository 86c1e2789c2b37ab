"""DPM-Encoder: exact reconstruction, agreement with diffusers, translation, batch invariance."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.diffusion import (
    dpm_decode,
    dpm_decode_model_space,
    dpm_encode,
    dpm_encode_model_space,
    load_denoiser,
)
from pipeline.diffusion.sampling import innovation_scale  # noqa: F401 - documented contract
from pipeline.diffusion.schedule import ddim_sigma, schedule_from_scheduler


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def with_scheduler(den, **ddim_config):
    """The same network under a DDIM scheduler configuration of the test's choosing."""
    den.schedule = schedule_from_scheduler(
        DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **ddim_config)
    )
    return den


def last_sigma(den, z) -> float:
    last = den.schedule.steps_along(z.timesteps)[-1]
    return ddim_sigma(z.eta, last.alpha_t, last.alpha_prev)


@torch.no_grad()
def diffusers_ddim_decode(unet, scheduler, z, steps: int) -> torch.Tensor:
    """The reference: diffusers' own DDIMScheduler.step driven by z's noise from z.x_start."""
    scheduler.set_timesteps(steps)
    x = z.x_start.clone()
    for i, t in enumerate(z.timesteps):
        out = unet(x, torch.tensor([t] * x.shape[0])).sample
        x = scheduler.step(out, t, x, eta=z.eta, variance_noise=z.noise[:, i]).prev_sample
    return x


# (steps, eta, strength, guidance) combinations
COMBOS = [(10, 0.1, 0.8, 1.0), (25, 1.0, 1.0, 1.0), (7, 0.5, 0.3, 3.0), (50, 0.3, 0.05, 7.5)]
# scheduler variants where the last step has σ > 0
SIGMA_POSITIVE = [dict(steps_offset=1, set_alpha_to_one=False), dict(timestep_spacing="trailing", set_alpha_to_one=False)]
# (steps_offset=0 with set_alpha_to_one=False still has σ = 0 on the last step: t = 0 → ᾱ_0 is no move.)


@pytest.mark.parametrize("sched", SIGMA_POSITIVE)
@pytest.mark.parametrize("steps,eta,strength,guidance", COMBOS)
def test_pixel_model_reconstructs_exactly(pixel_model, sched, steps, eta, strength, guidance):
    den = with_scheduler(load_denoiser(str(pixel_model)), **sched)
    x0 = images(3)
    z = dpm_encode(den, x0, steps=steps, eta=eta, strength=strength, guidance_scale=guidance, seeds=[1, 2, 3])
    assert last_sigma(den, z) > 0
    assert z.x_start.shape == (3, 3, 16, 16) and z.noise.shape == (3, len(z.timesteps), 3, 16, 16)
    assert len(z.timesteps) == max(1, int(steps * strength))
    x = dpm_decode(den, z, guidance_scale=guidance)
    assert (x - x0).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps,eta,strength,guidance", COMBOS)
def test_class_model_reconstructs_exactly(class_model, steps, eta, strength, guidance):
    den = load_denoiser(str(class_model), null_class=3)
    x0 = images(4, seed=1)
    cond = [0, 1, 2, 1]
    z = dpm_encode(den, x0, steps=steps, eta=eta, strength=strength, condition=cond, guidance_scale=guidance)
    x = dpm_decode(den, z, condition=cond, guidance_scale=guidance)
    assert (x - x0).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps,eta,strength,guidance", COMBOS)
def test_latent_model_reconstructs_exactly_in_latent_space(sd_model, steps, eta, strength, guidance):
    den = load_denoiser(str(sd_model))
    assert den.is_latent_model and den.conditioning == "text"
    x0 = den.to_model_space(images(2, seed=2))
    assert x0.shape == (2, 4, 8, 8)
    prompts = ["a photo of a cat", "a dog"]
    z = dpm_encode_model_space(den, x0, steps=steps, eta=eta, strength=strength, condition=prompts, guidance_scale=guidance)
    x = dpm_decode_model_space(den, z, condition=prompts, guidance_scale=guidance)
    assert (x - x0).abs().max().item() < 1e-4


def test_last_step_without_noise_carries_the_residual(pixel_model):
    """set_alpha_to_one with a grid ending at t=0: σ = 0 on the last step.

    The generative step there is deterministic and misses x0 by x0 − μ_θ; the latent
    stores that residual in the last slot, so reconstruction is still exact. Without it the
    error is exactly that residual, i.e. the error of x̂0 there.
    """
    den = load_denoiser(str(pixel_model))  # DDPM config → final ᾱ = 1, steps_offset 0
    assert den.schedule.final_alpha_cumprod == 1.0
    x0 = images(3, seed=3)
    z = dpm_encode(den, x0, steps=20, eta=0.5, strength=0.6, seeds=[7, 8, 9])
    assert z.timesteps[-1] == 0 and last_sigma(den, z) == 0
    assert (dpm_decode(den, z) - x0).abs().max().item() < 1e-4

    residual = z.noise[:, -1].clone()
    z.noise[:, -1] = 0
    without = dpm_decode_model_space(den, z)
    assert torch.allclose(x0 - without, residual, atol=1e-5)
    assert (x0 - without).abs().max().item() > 1e-3  # the x̂0 error is real, not rounding


@pytest.mark.parametrize("sched", [None, *SIGMA_POSITIVE])
def test_decoding_agrees_with_diffusers_ddim_step(pixel_model, sched):
    """Running DDIMScheduler.step with z's noise from z.x_start gives dpm_decode's images."""
    den = load_denoiser(str(pixel_model))
    if sched:
        den = with_scheduler(den, **sched)
    x0 = images(2, seed=4)
    # 10 divides 1000: diffusers' "t − T//S" previous timestep is then on the grid too
    z = dpm_encode(den, x0, steps=10, eta=0.7, strength=0.75, seeds=[4, 5])

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              **(sched or {}))
    x = diffusers_ddim_decode(den.unet, scheduler, z, steps=10)
    if last_sigma(den, z) == 0:  # diffusers has no slot for the residual of a σ = 0 step
        x = x + z.noise[:, -1]
    ours = dpm_decode_model_space(den, z)
    assert (ours - x).abs().max().item() < 1e-3
    assert (ours - x0).abs().max().item() < 1e-4


def test_each_step_goes_to_the_next_timestep_on_the_grid(pixel_model):
    """With trailing spacing and S not dividing T the grid is uneven; diffusers' DDIM step
    takes t − T//S as the previous timestep (off the grid), we take the next grid entry."""
    den = with_scheduler(load_denoiser(str(pixel_model)), timestep_spacing="trailing", set_alpha_to_one=False)
    grid = den.schedule.grid(12)
    assert grid[:3] == [999, 916, 832]
    moves = den.schedule.steps_along(grid)
    alphas = den.schedule.alphas_cumprod
    for m, t_next in zip(moves, grid[1:], strict=False):
        assert m.alpha_prev == pytest.approx(float(alphas[t_next]))
    assert moves[-1].alpha_prev == pytest.approx(float(alphas[0]))  # final ᾱ without set_alpha_to_one


def test_decoding_agrees_with_diffusers_for_v_prediction(models_dir):
    from tiny_models import _scheduler, save_pixel_model

    path = save_pixel_model(models_dir / "vpred", seed=5,
                            scheduler=_scheduler("ddim", prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False))
    den = load_denoiser(str(path))
    assert den.prediction_type == "v_prediction"
    x0 = images(2, seed=5)
    z = dpm_encode(den, x0, steps=8, eta=0.4, strength=1.0)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    x = diffusers_ddim_decode(den.unet, scheduler, z, steps=8)
    assert (dpm_decode_model_space(den, z) - x).abs().max().item() < 1e-3
    assert (dpm_decode(den, z) - x0).abs().max().item() < 1e-4


def test_translation_is_not_reconstruction(pixel_model, other_pixel_model, class_model, sd_model):
    x0 = images(2, seed=6)
    src, dst = load_denoiser(str(pixel_model)), load_denoiser(str(other_pixel_model))
    z = dpm_encode(src, x0, steps=10, eta=0.3, strength=0.8)
    assert (dpm_decode(dst, z) - x0).abs().mean().item() > 0.05

    cls = load_denoiser(str(class_model))
    z = dpm_encode(cls, x0, steps=10, eta=0.3, strength=0.8, condition=0)
    assert (dpm_decode(cls, z, condition=1) - x0).abs().mean().item() > 1e-2

    sd = load_denoiser(str(sd_model))
    lat = sd.to_model_space(x0)
    z = dpm_encode_model_space(sd, lat, steps=10, eta=0.3, strength=0.8, condition="a cat")
    other = dpm_decode_model_space(sd, z, condition="a dog", guidance_scale=5.0)
    assert (other - lat).abs().mean().item() > 1e-3


def _encode_alone_batched_shuffled(den, x0, cond, seeds, kw):
    full = dpm_encode(den, x0, condition=cond, seeds=seeds, **kw)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = dpm_encode(den, x0[perm], condition=[cond[i] for i in perm], seeds=[seeds[i] for i in perm], **kw)
    for j, i in enumerate(perm):
        alone = dpm_encode(den, x0[i : i + 1], condition=[cond[i]], seeds=[seeds[i]], **kw)
        yield alone, full[i], shuffled[j]


KW = dict(steps=10, eta=0.5, strength=0.7, guidance_scale=2.0)


def test_latent_of_a_sample_does_not_depend_on_its_batch(class_model):
    """float64, so that the network's batch-size-dependent rounding cannot hide a seeding bug."""
    den = load_denoiser(str(class_model), null_class=3, dtype="float64")
    x0 = images(8, seed=7)
    for alone, *batched in _encode_alone_batched_shuffled(den, x0, [i % 3 for i in range(8)], [100 + i for i in range(8)], KW):
        for z in batched:
            assert (z.x_start - alone.x_start).abs().max().item() < 1e-5
            assert (z.noise - alone.noise).abs().max().item() < 1e-5


def test_latent_batch_invariance_in_float32(class_model):
    """In float32 the network itself rounds differently per batch size (~1e-6); ε_t = (x_p − μ)/σ_t
    divides that by σ_t, small near t = 0, so compare what decoding adds: σ_t·ε_t."""
    den = load_denoiser(str(class_model), null_class=3)
    x0 = images(8, seed=7)
    for alone, *batched in _encode_alone_batched_shuffled(den, x0, [i % 3 for i in range(8)], [100 + i for i in range(8)], KW):
        scales = torch.tensor([
            ddim_sigma(alone.eta, m.alpha_t, m.alpha_prev) or 1.0 for m in den.schedule.steps_along(alone.timesteps)
        ]).view(1, -1, 1, 1, 1)
        for z in batched:
            assert torch.equal(z.x_start, alone.x_start)  # elementwise from x0 and per-sample noise
            assert ((z.noise - alone.noise) * scales).abs().max().item() < 1e-5


def test_same_seed_same_latent_other_seed_other_latent(pixel_model):
    den = load_denoiser(str(pixel_model))
    x0 = images(1)
    a = dpm_encode(den, x0, steps=5, eta=1.0, seeds=[1])
    b = dpm_encode(den, x0, steps=5, eta=1.0, seeds=[1])
    c = dpm_encode(den, x0, steps=5, eta=1.0, seeds=[2])
    assert torch.equal(a.x_start, b.x_start) and torch.equal(a.noise, b.noise)
    assert (a.x_start - c.x_start).abs().max().item() > 0.1


def test_eta_zero_is_rejected_with_a_clear_error(pixel_model):
    den = load_denoiser(str(pixel_model))
    with pytest.raises(ValueError, match=r"eta > 0.*ddim_invert"):
        dpm_encode(den, images(1), eta=0.0)


def test_translation_takes_a_sigma_zero_last_step_as_diffusers_does(pixel_model, other_pixel_model):
    """Issue 12.2: decoding with another model ignores the source's residual in the σ = 0 slot,
    so it agrees with diffusers' DDIMScheduler.step driven by the same stored noises (which
    multiplies that slot by σ = 0), as the official code's last, noise-free step does."""
    src, dst = load_denoiser(str(pixel_model)), load_denoiser(str(other_pixel_model))
    assert src.schedule.final_alpha_cumprod == 1.0  # last step σ = 0
    z = dpm_encode(src, images(3, seed=9), steps=10, eta=0.7, strength=0.75, seeds=[1, 2, 3])
    assert last_sigma(dst, z) == 0 and z.noise[:, -1].abs().max() > 1e-3  # a residual is stored
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    reference = diffusers_ddim_decode(dst.unet, scheduler, z, steps=10)
    ours = dpm_decode_model_space(dst, z)
    assert (ours - reference).abs().max().item() < 1e-4
    forced = dpm_decode_model_space(dst, z, reconstruct=True)  # the old behaviour, still reachable
    assert torch.allclose(forced - ours, z.noise[:, -1], atol=1e-5)


def test_same_model_other_condition_is_a_translation_too(class_model):
    den = load_denoiser(str(class_model), null_class=3)
    x0 = images(2, seed=10)
    z = dpm_encode(den, x0, steps=10, eta=0.5, strength=0.8, condition=0, seeds=[3, 4])
    assert (dpm_decode(den, z, condition=0) - x0).abs().max().item() < 1e-4  # reconstruction: exact
    plain = dpm_decode_model_space(den, z, condition=1)
    forced = dpm_decode_model_space(den, z, condition=1, reconstruct=True)
    assert torch.allclose(forced - plain, z.noise[:, -1], atol=1e-5)  # translation: no residual


@torch.no_grad()
def official_refine(den, x0, refine_steps: int, seeds) -> torch.Tensor:
    """cycle-diffusion ddpm_ddim_wrapper.py:431-453 through diffusers' DDIMScheduler: noise to
    t = R − 1, then DDIM steps with η = 1 on the 1000-step grid (t → t − 1), the step from t = 0
    to ᾱ = 1 with σ = 0. Noise maps drawn as refine draws them (the "refine" stream: map 0
    re-noises, map i + 1 is step i's)."""
    from pipeline.diffusion import per_sample_noise

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    scheduler.set_timesteps(1000)
    shape = tuple(x0.shape[1:])
    a = float(scheduler.alphas_cumprod[refine_steps - 1])
    x = a**0.5 * x0 + (1 - a) ** 0.5 * per_sample_noise(seeds, shape, stream="refine", index=0)
    for i, t in enumerate(range(refine_steps - 1, -1, -1)):
        out = den.unet(x, torch.tensor([t] * x.shape[0])).sample
        x = scheduler.step(out, t, x, eta=1.0, variance_noise=per_sample_noise(seeds, shape, stream="refine", index=i + 1)).prev_sample
    return x


def test_refine_follows_the_official_recipe(pixel_model):
    """Issue 12.1: refine_steps counts training timesteps (refine 3 → re-noise to t = 2, denoise
    t = 2, 1, 0), whatever grid decoded the image."""
    from pipeline.diffusion.dpm import refine

    den = load_denoiser(str(pixel_model))
    x0 = images(2, seed=11)
    ours = refine(den, x0, 3, [5, 6])
    assert (ours - official_refine(den, x0, 3, [5, 6])).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match=r"refine_steps = 1001 must lie in 1..1000"):
        refine(den, x0, 1001, [5, 6])


def test_refine_adds_no_noise_on_its_last_step(pixel_model, other_pixel_model):
    """Issue 12.1: the step into ᾱ = 1 has σ = 0; refine 1 re-noises to t = 0 (√(1 − ᾱ_0) = 0.01)
    and takes that one step, so the image barely moves (it moved by unit noise before)."""
    src, dst = load_denoiser(str(pixel_model)), load_denoiser(str(other_pixel_model))
    z = dpm_encode(src, images(2, seed=12), steps=50, eta=0.3, strength=0.8, seeds=[1, 2])
    plain = dpm_decode_model_space(dst, z)
    refined = dpm_decode_model_space(dst, z, refine_steps=1)
    assert (refined - plain).std().item() < 0.05
    assert (dpm_decode_model_space(dst, z, refine_steps=10) - plain).std().item() < 0.5


def test_refine_steps_change_the_output_deterministically(pixel_model, other_pixel_model):
    src, dst = load_denoiser(str(pixel_model)), load_denoiser(str(other_pixel_model))
    x0 = images(2, seed=8)
    z = dpm_encode(src, x0, steps=10, eta=0.3, strength=0.8, seeds=[1, 2])
    plain = dpm_decode(dst, z)
    refined = dpm_decode(dst, z, refine_steps=20)
    again = dpm_decode(dst, z, refine_steps=20)
    assert torch.equal(refined, again)
    assert (refined - plain).abs().mean().item() > 1e-3
    assert refined.min() >= -1 and refined.max() <= 1


def test_mixing_pixel_and_latent_models_is_a_clear_error(pixel_model, sd_model):
    pix, sd = load_denoiser(str(pixel_model)), load_denoiser(str(sd_model))
    z = dpm_encode(pix, images(1), steps=4, eta=0.5)
    with pytest.raises(ValueError, match="channels"):
        dpm_decode(sd, z)
