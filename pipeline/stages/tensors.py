"""uint8 image batches ↔ model tensors, on whatever device the tensor is on."""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(pixels) -> torch.Tensor:
    """(B, H, W, 3) uint8 (numpy, or a tensor on any device) → (B, 3, H, W) float32 in [-1, 1], same device."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, rounded, on x's device (a quarter of float32's bytes to copy)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 numpy on the host."""
    return to_uint8_tensor(x).cpu().numpy()
