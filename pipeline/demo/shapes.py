"""Procedural demo domains: 32×32 RGB, black background, one filled shape.

``discs``, ``squares`` (axis-aligned) or ``triangles`` (apex up). Hue uniform in [0, 360),
saturation 1, value uniform in [0.8, 1.0]; bounding-box side uniform in [12, 24] px, placed
uniformly so the shape is fully inside. Hard edges (no anti-aliasing), so the shape metric
can read a shape off its fill ratio. Seeded and vectorised: a batch is a few numpy ops.

``aligned=True`` fixes the box instead: side ``ALIGNED_SIDE`` = 20 px, centred (6 px margins),
so every sample has the same mask and only its colour varies, as the centred or aligned
datasets of the unseen-synthesis paper (AFHQ, CelebA-HQ, LSUN) are. 20 px lies inside the
sizes the bundled models were trained on (12–24, mean 18), is even so the box centres exactly on
the 32 px canvas, and gives the triangle's apex enough pixels for the fill-ratio metric. The
colour draws are those of the unaligned domain with the same seed. The bundled models were
trained on the unaligned default, which stays as it was.

``sides=(lo, hi)`` draws the side from a narrower part of the trained range instead (aligned: the
centred box takes that side, not 20 px): the demo's h-space edit fits small → large centred discs.
Without it the draws are the default's, bit for bit.
"""

from __future__ import annotations

import io
import json

import numpy as np

DOMAINS = ("discs", "squares", "triangles")
SIZE = 32
SIDE_RANGE = (12, 24)
ALIGNED_SIDE = 20


def hsv_to_rgb(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV → RGB in [0, 1]; h in degrees."""
    h = (np.asarray(h, dtype=np.float64) % 360.0) / 60.0
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    z = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(table):
        m = sector == k
        rgb[m] = np.stack([r[m], g[m], b[m]], -1)
    return rgb + (v - c)[..., None]


def shape_masks(domain: str, side: np.ndarray, left: np.ndarray, top: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(B, size, size) boolean masks of each sample's filled shape in its box (pixel centres)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    s = side[:, None, None].astype(np.float64)
    u = (xx[None] - left[:, None, None]) / s  # box coordinates in [0, 1]
    v = (yy[None] - top[:, None, None]) / s
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if domain == "squares":
        return inside
    if domain == "discs":
        return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
    return inside & (np.abs(u - 0.5) <= v / 2)  # apex at the top centre, base along the bottom


def render(domain: str, count: int, seed: int = 0, aligned: bool = False,
           sides: tuple[int, int] | None = None) -> tuple[np.ndarray, list[dict]]:
    """(count, 32, 32, 3) uint8 images and their metadata (domain, hue, value, box).

    ``sides``: the side's range, inclusive, inside ``SIDE_RANGE`` (default: all of it; aligned: 20 px).
    """
    lo, hi = sides or SIDE_RANGE
    if not SIDE_RANGE[0] <= lo <= hi <= SIDE_RANGE[1]:
        raise ValueError(f"sides {lo}..{hi} must lie in the trained range {SIDE_RANGE[0]}..{SIDE_RANGE[1]}")
    rng = np.random.default_rng([seed, DOMAINS.index(domain) if domain in DOMAINS else 99])
    side = rng.integers(lo, hi + 1, count)
    left = np.floor(rng.random(count) * (SIZE - side + 1)).astype(int)
    top = np.floor(rng.random(count) * (SIZE - side + 1)).astype(int)
    if aligned:  # drawn above all the same, so the colours below match the unaligned domain's
        side = side if sides else np.full(count, ALIGNED_SIDE)
        left = top = (SIZE - side) // 2
    hue = rng.random(count) * 360.0
    value = 0.8 + 0.2 * rng.random(count)
    colour = hsv_to_rgb(hue, 1.0, value)  # (count, 3)
    mask = shape_masks(domain, side, left, top)
    images = np.rint(mask[..., None] * colour[:, None, None, :] * 255).astype(np.uint8)
    meta = [{"domain": domain, "hue": float(h), "value": float(v), "box": [int(x), int(y), int(s), int(s)]}
            for h, v, x, y, s in zip(hue, value, left, top, side, strict=True)]
    return images, meta


def write_shapes(domain: str, count: int, out: str, seed: int = 0, per_shard: int = 256,
                 storage_options: dict | None = None, aligned: bool = False,
                 sides: tuple[int, int] | None = None) -> list[str]:
    """Write ``count`` images of ``domain`` as WebDataset shards ``<out>/<domain>-NNNNN.tar``
    (``aligned``, ``sides``: see ``render``)."""
    from PIL import Image

    from pipeline.data.filesystems import put_bytes, url_to_fs
    from pipeline.data.shards import write_samples

    images, meta = render(domain, count, seed, aligned=aligned, sides=sides)
    fs, root = url_to_fs(out, storage_options)
    fs.makedirs(root, exist_ok=True)
    written = []
    for n in range(0, count, per_shard):
        samples = []
        for i in range(n, min(count, n + per_shard)):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            samples.append((f"{domain}-{i:06d}", {"png": buf.getvalue(), "json": json.dumps(meta[i]).encode()}))
        buf = io.BytesIO()
        write_samples(buf, samples)
        path = f"{root.rstrip('/')}/{domain}-{n // per_shard:05d}.tar"
        put_bytes(fs, path, buf.getvalue())
        written.append(path)
    return written

