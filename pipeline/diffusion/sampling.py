"""The generative DDIM walk every decoder here is: x_p = μ_θ(x_t) + s_t · noise_i.

k-diffusion style: short functions of (model, x, timesteps) that can be read on one screen.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim_step import generative_mean, predict_x0
from pipeline.diffusion.schedule import Step, ddim_sigma


def innovation_scale(sigma: float, residual: bool = False) -> float:
    """Weight of a step's innovation: σ_t; where σ_t = 0, 1 for a DPM-Encoder residual being
    replayed (``residual``), else 0.

    A step with σ_t = 0 (the last one, with ``set_alpha_to_one``) is deterministic, as in the
    official code (cycle-diffusion model/gan_wrapper/ddpm_ddim_wrapper.py:424, the last step
    takes no stored noise) and diffusers' DDIMScheduler.step. The DPM-Encoder stores the
    residual x0 − μ_θ(x_t) in that slot, and only a reconstruction (decoding with the encoding
    model and condition) adds it back, landing exactly on x0 (see ``dpm.dpm_decode``).
    """
    if sigma > 0:
        return sigma
    return 1.0 if residual else 0.0


def step_mean(den, x_t: torch.Tensor, step: Step, sigma: float, condition=None, guidance_scale: float = 1.0):
    """μ_θ(x_t) = √ᾱ_p x̂0 + c2 ε_θ, with x̂0 clipped/thresholded as the model's scheduler does."""
    return mean_from_eps(den, x_t, den.eps(x_t, step.t, condition, guidance_scale), step, sigma)


def mean_from_eps(den, x_t: torch.Tensor, eps: torch.Tensor, step: Step, sigma: float) -> torch.Tensor:
    """μ_θ(x_t) from an ε_θ already computed (e.g. in one network call with other walks)."""
    x0_hat = den.schedule.process_x0(predict_x0(x_t, eps, step.alpha_t))
    return generative_mean(x0_hat, eps, step.alpha_prev, sigma)


def denoise(
    den,
    x_t: torch.Tensor,
    timesteps: list[int],
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    condition=None,
    guidance_scale: float = 1.0,
    residual: bool = False,
) -> torch.Tensor:
    """Walk x_t down the descending grid ``timesteps`` to the end, in float32.

    noise: (B, K, …) innovations, one per step, or None for the deterministic walk (η = 0).
    residual: a σ_t = 0 step adds its slot of ``noise`` (a DPM-Encoder residual, for an exact
    reconstruction); otherwise such a step is deterministic.
    """
    x = x_t.to(den.device, torch.float32)
    if noise is not None:
        noise = noise.to(den.device, torch.float32)
    for i, step in enumerate(den.schedule.steps_along(timesteps)):
        sigma = ddim_sigma(eta, step.alpha_t, step.alpha_prev)
        x_next = step_mean(den, x, step, sigma, condition, guidance_scale)
        if noise is not None:
            x_next = x_next + innovation_scale(sigma, residual) * noise[:, i]
        x = x_next
    return x
