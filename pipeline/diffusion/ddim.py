"""Deterministic DDIM inversion and decoding (η = 0; Song et al. 2021, §4.3 / eq. 13).

Inversion walks the grid upward from x0: x_t = √ᾱ_t x̂0(x_p) + √(1−ᾱ_t) ε_θ(x_p, t),
with ε evaluated at the lower state — the usual approximation ε_θ(x_t, t) ≈ ε_θ(x_p, t),
which is why the reconstruction error is measured, not assumed (it falls with more steps).
"""

from __future__ import annotations

import torch

from pipeline.diffusion.ddim_step import predict_x0
from pipeline.diffusion.dpm import _check_shape
from pipeline.diffusion.latent import Latent
from pipeline.diffusion.sampling import denoise


def ddim_invert(den, x0: torch.Tensor, **kwargs) -> Latent:
    """Images (B,3,H,W) in [-1,1] → DDIM latent. Keyword arguments as ``ddim_invert_model_space``."""
    return ddim_invert_model_space(den, den.to_model_space(x0), **kwargs)


def ddim_decode(den, z: Latent, **kwargs) -> torch.Tensor:
    """DDIM latent → images (B,3,H,W) in [-1,1]."""
    return den.to_pixels(ddim_decode_model_space(den, z, **kwargs))


def inversion_grid(den, steps: int, strength: float = 1.0, t0: int | None = None) -> list[int]:
    """The descending grid an inversion walks: cut by ``strength``, or from ``t0`` (snapped to
    the grid, ``Schedule.grid_from``; the latent's ``timesteps[0]`` is the t0 used)."""
    if t0 is None:
        return den.schedule.grid(steps, strength)
    return den.schedule.grid_from(t0, steps)


@torch.no_grad()
def ddim_invert_model_space(
    den,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    strength: float = 1.0,
    t0: int | None = None,
    condition=None,
    guidance_scale: float = 1.0,
    timesteps: list[int] | None = None,
) -> Latent:
    """``timesteps`` (descending) overrides the grid that steps/strength/t0 would choose."""
    if timesteps is None:
        timesteps = inversion_grid(den, steps, strength, t0)
    x = x0.to(den.device, torch.float32)
    for step in reversed(den.schedule.steps_along(timesteps)):
        eps = den.eps(x, step.t, condition, guidance_scale)
        x0_hat = den.schedule.process_x0(predict_x0(x, eps, step.alpha_prev))
        x = step.alpha_t**0.5 * x0_hat + (1 - step.alpha_t) ** 0.5 * eps  # DDIM eq. 13, run upward
    empty = x.new_zeros((x.shape[0], 0, *x.shape[1:]))
    return Latent(x_start=x, noise=empty, timesteps=timesteps, method="ddim", eta=0.0, source=den.source,
                  condition=condition)


@torch.no_grad()
def ddim_decode_model_space(den, z: Latent, *, condition=None, guidance_scale: float = 1.0) -> torch.Tensor:
    if z.method != "ddim":
        raise ValueError(f"ddim_decode needs a ddim latent, got method {z.method!r}; use dpm_decode")
    _check_shape(den, z)
    return denoise(den, z.x_start, z.timesteps, eta=0.0, condition=condition, guidance_scale=guidance_scale)
