"""An analytic shape metric for the demo domains: which shape, what colour, where.

Segment the non-black pixels, take their bounding box, and read the shape off the fill
ratio inside it: a disc fills π/4 ≈ 0.785 of its box, a square 1, an apex-up triangle 1/2.
"""

from __future__ import annotations

import numpy as np

FILL = {"triangles": 0.5, "discs": float(np.pi / 4), "squares": 1.0}
# decision boundaries halfway between the ideal fill ratios
_BOUNDS = ((FILL["triangles"] + FILL["discs"]) / 2, (FILL["discs"] + FILL["squares"]) / 2)


def measure_shapes(images: np.ndarray, threshold: int = 100, min_pixels: int = 16) -> dict[str, np.ndarray]:
    """Per image of (B, H, W, 3) uint8: label, fill ratio, mean hue (degrees), centroid (x, y), box side.

    Label "none" where fewer than ``min_pixels`` pixels are lit.
    """
    images = np.asarray(images)
    mask = images.max(axis=3) > threshold  # (B, H, W)
    count = mask.sum(axis=(1, 2))
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    h, w = mask.shape[1:]
    idx_r, idx_c = np.arange(h), np.arange(w)
    top = np.where(rows, idx_r[None], h).min(1)
    bottom = np.where(rows, idx_r[None], -1).max(1)
    left = np.where(cols, idx_c[None], w).min(1)
    right = np.where(cols, idx_c[None], -1).max(1)
    area = np.clip(bottom - top + 1, 1, None) * np.clip(right - left + 1, 1, None)
    fill = count / area
    label = np.where(fill < _BOUNDS[0], "triangles", np.where(fill < _BOUNDS[1], "discs", "squares")).astype(object)
    label[count < min_pixels] = "none"

    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    safe = np.maximum(count, 1)
    cx = (mask * xx[None]).sum((1, 2)) / safe
    cy = (mask * yy[None]).sum((1, 2)) / safe
    rgb = images.astype(np.float64) / 255.0
    mx, mn = rgb.max(3), rgb.min(3)
    d = np.where(mx - mn == 0, 1e-12, mx - mn)
    r, g, bl = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(mx == r, ((g - bl) / d) % 6, np.where(mx == g, (bl - r) / d + 2, (r - g) / d + 4)) * 60.0
    ang = np.deg2rad(hue)
    mean_hue = np.rad2deg(np.arctan2((np.sin(ang) * mask).sum((1, 2)), (np.cos(ang) * mask).sum((1, 2)))) % 360
    return {"label": label, "fill": fill, "hue": mean_hue, "centroid": np.stack([cx, cy], 1),
            "pixels": count, "side": np.maximum(bottom - top + 1, right - left + 1)}


def hue_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute circular difference of hues in degrees, in [0, 180]."""
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360
    return np.minimum(d, 360 - d)


def shape_rate(images: np.ndarray, shape: str) -> float:
    """Fraction of images the metric labels as ``shape``."""
    return float((measure_shapes(images)["label"] == shape).mean()) if len(images) else 0.0
