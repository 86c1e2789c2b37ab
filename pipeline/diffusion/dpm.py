"""DPM-Encoder and decoder (CycleDiffusion: Wu & De la Torre, "A Latent Space of Stochastic
Diffusion Models", ICLR 2023; seeds 000/002).

The latent of x0 is z = (x_{t0}, ε_{τ_k}, …, ε_{τ_1}): the noised start and the noise every
stochastic DDIM step (η > 0) would need to walk from x_{t0} through the encoder's own
posterior samples back to x0. Decoding z with the same model and condition reproduces x0;
decoding it with another model or condition is zero-shot translation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.diffusion.ddim_step import forward_noise, posterior_sample
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.noise import NoiseSource, default_seeds
from pipeline.diffusion.sampling import denoise, innovation_scale, mean_from_eps, step_mean
from pipeline.diffusion.schedule import ddim_sigma


def dpm_encode(den, x0: torch.Tensor, **kwargs) -> Latent:
    """Images (B,3,H,W) in [-1,1] → DPM latent. Keyword arguments as ``dpm_encode_model_space``."""
    return dpm_encode_model_space(den, den.to_model_space(x0), **kwargs)


def dpm_decode(den, z: Latent, **kwargs) -> torch.Tensor:
    """DPM latent → images (B,3,H,W) in [-1,1]. Keyword arguments as ``dpm_decode_model_space``."""
    return den.to_pixels(dpm_decode_model_space(den, z, **kwargs))


@torch.no_grad()
def dpm_translate(
    source,
    target,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    eta: float = 0.1,
    strength: float = 0.8,
    source_condition=None,
    source_guidance: float = 1.0,
    target_condition=None,
    target_guidance: float = 1.0,
    seeds: Sequence[int] | None = None,
    refine_steps: int = 0,
    keep_noise: bool = True,
) -> tuple[Latent, torch.Tensor]:
    """Images → (source latent, target images): ``dpm_encode`` with the source, ``dpm_decode`` with the target.

    When source and target are one model (zero-shot: one model, two conditions), the decoder
    walks in lockstep with the encoder: step i of both is one network call carrying the source
    and target batches and their guidance branches, as diffusers' CycleDiffusionPipeline does
    (pipeline_cycle_diffusion.py, one ``unet`` call per step over source and target latents).
    The result equals encode-then-decode up to float rounding. ``keep_noise=False`` returns a
    start-only latent (for ``output.latents: start | none``), holding no per-step maps.
    """
    if source is not target:
        z = dpm_encode(source, x0, steps=steps, eta=eta, strength=strength, condition=source_condition,
                       guidance_scale=source_guidance, seeds=seeds)
        x = dpm_decode(target, z, condition=target_condition, guidance_scale=target_guidance,
                       refine_steps=refine_steps)
        return (z if keep_noise else z.without_noise()), x
    reconstruct = same_condition(source_condition, target_condition)
    z, (y,) = encode_walk(source, source.to_model_space(x0), steps, eta, strength, source_condition, source_guidance,
                           seeds, decoders=[(target_condition, target_guidance, reconstruct)], keep_noise=keep_noise)
    if refine_steps > 0:
        y = refine(target, y, refine_steps, z.seeds, target_condition, target_guidance)
    return z, target.to_pixels(y)


@torch.no_grad()
def dpm_encode_model_space(
    den,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    eta: float = 0.1,
    strength: float = 0.8,
    condition=None,
    guidance_scale: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> Latent:
    """x0 in the model's space → z; ε_t solved from the generative step at each t → p.

    On the last step the posterior "sample" is x0 itself, so decoding ends on x0 exactly.
    Where that step has σ_t = 0 (ᾱ_p = 1: ``set_alpha_to_one`` with a grid ending at t = 0)
    there is no noise to solve for and the generative step is deterministic, missing x0 by
    the model's x̂0 error there; we store that residual x0 − μ_θ in the step's slot, which a
    reconstruction adds back (exact for every scheduler configuration) and a translation
    ignores, taking that step deterministically as the official code and diffusers do.
    """
    z, _ = encode_walk(den, x0, steps, eta, strength, condition, guidance_scale, seeds)
    return z


def encode_walk(den, x0, steps, eta, strength, condition, guidance_scale, seeds, decoders=(),
                 keep_noise=True, timesteps=None) -> tuple[Latent, list[torch.Tensor]]:
    """The DPM-Encoder's walk; for each of ``decoders`` = [(condition, guidance_scale, reconstruct), …],
    also the generative walk of the same model under that condition and scale, driven by each ε_t as
    soon as it is solved: one network call per step carries the encoder and every decoder (the
    zero-shot search decodes one encoding at several scales this way). ``timesteps`` replaces the grid
    of (steps, strength) when given."""
    if not eta > 0:
        raise ValueError(
            f"the DPM-Encoder is stochastic and needs eta > 0 (got {eta}); "
            "for a deterministic latent use ddim_invert (sampler.method: ddim)"
        )
    x0 = x0.to(den.device, torch.float32)
    timesteps = den.schedule.grid(steps, strength) if timesteps is None else list(timesteps)
    moves = den.schedule.steps_along(timesteps)
    seeds = list(seeds) if seeds is not None else default_seeds(x0.shape[0])
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {x0.shape[0]}")
    # map 0 noises x0 to t0, map i + 1 is the posterior noise of step i; each drawn on the device when needed
    noise, shape = NoiseSource(seeds, den.device), tuple(x0.shape[1:])

    x_t = forward_noise(x0, moves[0].alpha_t, noise.draw(0, shape))  # x_{t0} = √ᾱ x0 + √(1−ᾱ) n
    x_start = x_t
    ys = [x_t] * len(decoders)  # the decoders alongside start where the encoder does
    innovations = []
    for i, m in enumerate(moves):
        sigma = ddim_sigma(eta, m.alpha_t, m.alpha_prev)
        x_p = x0 if m.is_last else posterior_sample(x0, x_t, m.alpha_t, m.alpha_prev, sigma, noise.draw(i + 1, shape))
        parts = [(x_t, condition, guidance_scale)] + [(y, c, w) for y, (c, w, _) in zip(ys, decoders, strict=True)]
        eps = den.eps_many(m.t, parts)
        eps_t = (x_p - mean_from_eps(den, x_t, eps[0], m, sigma)) / innovation_scale(sigma, residual=True)  # ε_t = (x_p − μ_θ)/σ_t
        # x_p = μ_θ + σ_t ε_t on each decoder's side (denoise's step)
        ys = [mean_from_eps(den, y, e, m, sigma) + innovation_scale(sigma, d[2]) * eps_t
              for y, e, d in zip(ys, eps[1:], decoders, strict=True)]
        if keep_noise:
            innovations.append(eps_t)
        x_t = x_p
    z = Latent(
        x_start=x_start,
        noise=torch.stack(innovations, 1) if keep_noise else x_start.new_zeros((x0.shape[0], 0, *shape)),
        timesteps=timesteps,
        method="dpm",
        eta=float(eta),
        seeds=[int(s) for s in seeds],
        source=den.source,
        condition=condition,
    )
    return z, ys


@torch.no_grad()
def dpm_decode_model_space(
    den,
    z: Latent,
    *,
    condition=None,
    guidance_scale: float = 1.0,
    refine_steps: int = 0,
    reconstruct: bool | None = None,
) -> torch.Tensor:
    """z → x0 in the model's space: the generative walk driven by z's own noise.

    ``reconstruct``: replay the encoder's residual on a σ_t = 0 last step, landing exactly on
    the encoded x0. None (the default) decides by the latent: yes when ``den`` and
    ``condition`` are the ones it was encoded with, no for a translation (another model or
    condition), whose last step is then deterministic as in the official code and diffusers.
    ``refine_steps`` > 0 then refines the result (``refine``).
    """
    if z.method != "dpm":
        raise ValueError(f"dpm_decode needs a dpm latent, got method {z.method!r}; use ddim_decode")
    if z.start_only:
        raise ValueError("this dpm latent holds x_start only (output.latents: start); decoding needs output.latents: full")
    _check_shape(den, z)
    if reconstruct is None:
        reconstruct = is_reconstruction(den, z, condition)
    x0 = denoise(den, z.x_start, z.timesteps, eta=z.eta, noise=z.noise, condition=condition,
                 guidance_scale=guidance_scale, residual=reconstruct)
    if refine_steps > 0:
        x0 = refine(den, x0, refine_steps, z.seeds, condition, guidance_scale)
    return x0


def is_reconstruction(den, z: Latent, condition) -> bool:
    """Decoding ``z`` with ``den`` and ``condition`` goes back to where it was encoded."""
    if z.source is None or z.source != den.source:
        return False
    return same_condition(z.condition, condition)


@torch.no_grad()
def refine(den, x0: torch.Tensor, refine_steps: int, seeds: Sequence[int], condition=None,
           guidance_scale: float = 1.0) -> torch.Tensor:
    """CycleDiffusion's refinement (cycle-diffusion model/gan_wrapper/ddpm_ddim_wrapper.py:431-453):
    noise x0 to t = refine_steps − 1 on the training scale (refine 100 → t = 99), then denoise
    through every timestep below it with η = 1; the last step, to the scheduler's final ᾱ,
    has σ = 0 there and adds no noise. ``refine_steps`` is that count, whatever grid decoded x0.
    """
    n_train = den.schedule.num_train_timesteps
    if not 1 <= refine_steps <= n_train:
        raise ValueError(f"refine_steps = {refine_steps} must lie in 1..{n_train} (the model's training timesteps)")
    if not seeds:
        seeds = default_seeds(x0.shape[0])
    timesteps = list(range(refine_steps - 1, -1, -1))
    shape, noise = tuple(x0.shape[1:]), NoiseSource(seeds, den.device, "refine")
    x = forward_noise(x0, den.schedule.alpha(timesteps[0]), noise.draw(0, shape))
    for i, step in enumerate(den.schedule.steps_along(timesteps)):
        sigma = ddim_sigma(1.0, step.alpha_t, step.alpha_prev)  # η = 1 (ddpm_ddim_wrapper.py:435)
        x = step_mean(den, x, step, sigma, condition, guidance_scale)
        if sigma > 0:  # one map per step, drawn as it is needed: refine 1000 would not fit at once
            x = x + sigma * noise.draw(i + 1, shape)
    return x


def same_condition(a, b) -> bool:
    try:
        return bool(a == b)
    except (TypeError, RuntimeError):  # e.g. tensors, which compare elementwise
        return False


def _check_shape(den, z: Latent) -> None:
    expected_c = den.unet.config.in_channels
    if z.x_start.shape[1] != expected_c:
        raise ValueError(
            f"latent has {z.x_start.shape[1]} channels but model {den.source!r} works on {expected_c}; "
            "pixel-model and latent-model latents cannot be mixed"
        )
