"""The three formulas of the DDIM family that every encoder and decoder here is built from.

Notation of docs/maths.md, "Notation" (ᾱ = alphas_cumprod, step t → p). Plain functions on tensors so
that each line can be checked against the paper.
"""

from __future__ import annotations

import math

import torch


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε_θ) / √ᾱ_t   (DDIM eq. 9)."""
    return (x_t - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)


def direction_scale(alpha_prev: float, sigma: float) -> float:
    """c2 = √(1 − ᾱ_p − σ_t²), the weight of the "direction pointing to x_t" (DDIM eq. 12)."""
    return math.sqrt(max(0.0, 1 - alpha_prev - sigma**2))


def generative_mean(
    x0_hat: torch.Tensor, eps: torch.Tensor, alpha_prev: float, sigma: float
) -> torch.Tensor:
    """μ = √ᾱ_p x̂0 + c2 ε_θ; the generative step is x_p = μ + σ_t ε_t   (DDIM eq. 12)."""
    return math.sqrt(alpha_prev) * x0_hat + direction_scale(alpha_prev, sigma) * eps


def posterior_sample(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: float,
    alpha_prev: float,
    sigma: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """x_p ~ q_σ(x_p | x_t, x0) = √ᾱ_p x0 + c2 (x_t − √ᾱ_t x0)/√(1−ᾱ_t) + σ_t n   (DDIM eq. 7)."""
    eps_true = (x_t - math.sqrt(alpha_t) * x0) / math.sqrt(1 - alpha_t)
    return generative_mean(x0, eps_true, alpha_prev, sigma) + sigma * noise


def forward_noise(x0: torch.Tensor, alpha_t: float, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) n   (DDPM eq. 4)."""
    return math.sqrt(alpha_t) * x0 + math.sqrt(1 - alpha_t) * noise
