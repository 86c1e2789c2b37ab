"""PSNR and SSIM between image batches, batched in torch on the batches' device (per-sample results).

float64 on the CPU (exact against skimage); float32 on a GPU, where float64 is slow on most
cards and float32 holds SSIM of 8-bit images to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-sample PSNR in dB of (B, C, H, W) batches; inf where identical."""
    a, b = a.to(_dtype(a)), b.to(_dtype(a))
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.device.type == "cpu" else torch.float32


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004: 11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03),
    averaged over channels and valid positions, as skimage's ``gaussian_weights=True``."""
    a, b = a.to(_dtype(a)), b.to(_dtype(a))
    c = a.shape[1]
    g = _gaussian_window(min(11, a.shape[-1], a.shape[-2]) | 1, dtype=a.dtype, device=a.device)
    win = (g[:, None] * g[None, :]).expand(c, 1, -1, -1).contiguous()

    def blur(x):
        return F.conv2d(x, win, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
