"""The generative DDIM walk every decoder here is: x_p = μ_θ(x_t) + s_t · noise_i.

k-diffusion style: short functions of (model, x, timesteps) that can be read on one screen.
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim_step import generative_mean, predict_x0
from pipeline.diffusion.schedule import Step, ddim_sigma


def innovation_scale(sigma: float) -> float:
    """Weight of a step's stored innovation: σ_t, or 1 where σ_t = 0.

    A step with σ_t = 0 is deterministic; the DPM-Encoder then stores the residual
    x_p − μ_θ(x_t) itself (scale 1), so decoding with the same model lands exactly on
    the encoder's x_p (see ``dpm.dpm_encode``). For steps with σ_t > 0 the innovation
    is the standard-normal ε_t of the paper and the scale is σ_t.
    """
    return sigma if sigma > 0 else 1.0


def step_mean(den, x_t: torch.Tensor, step: Step, sigma: float, condition=None, guidance_scale: float = 1.0):
    """μ_θ(x_t) = √ᾱ_p x̂0 + c2 ε_θ, with x̂0 clipped/thresholded as the model's scheduler does."""
    eps = den.eps(x_t, step.t, condition, guidance_scale)
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
) -> torch.Tensor:
    """Walk x_t down the descending grid ``timesteps`` to the end, in float32.

    noise: (B, K, …) innovations, one per step, or None for the deterministic walk (η = 0).
    """
    x = x_t.to(den.device, torch.float32)
    if noise is not None:
        noise = noise.to(den.device, torch.float32)
    for i, step in enumerate(den.schedule.steps_along(timesteps)):
        sigma = ddim_sigma(eta, step.alpha_t, step.alpha_prev)
        x_next = step_mean(den, x, step, sigma, condition, guidance_scale)
        if noise is not None:
            x_next = x_next + innovation_scale(sigma) * noise[:, i]
        x = x_next
    return x
