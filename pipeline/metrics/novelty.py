"""Novelty of synthesized images: how far each one is from its nearest OOD input.

Synthesis that copies its references is not synthesis. For each synthesized image we take the
pixel distance to its nearest input, and set it beside the inputs' own nearest-neighbour
distances (leave-one-out): that is the scale at which two *different* images of the domain sit
apart. An image is "novel" when its nearest input is at least ``ratio`` (½) × the inputs' median
nearest-neighbour distance away; an exact copy has distance 0 and never is.

Distance: root-mean-square difference over all pixels and channels, pixels scaled to [0, 1]
(‖a − b‖₂ / √d), so figures read the same at any image size. Computed by differences, not by
the ‖a‖² + ‖b‖² − 2a·b expansion, so a copy measures exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch

NOVEL_RATIO = 0.5
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _flat(images) -> torch.Tensor:
    """(n, …) uint8 images → (n, d) float64 in [0, 1]."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"novelty measures uint8 images, got {arr.dtype}")
    return torch.from_numpy(arr.reshape(len(arr), -1)).to(torch.float64) / 255.0


def _pairwise_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) RMS distances; the direct difference form keeps identical rows at exactly 0."""
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return d / a.shape[1] ** 0.5


def nearest_input_distance(images, inputs, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the RMS distance to its nearest input and that input's index (batched over images)."""
    refs = _flat(inputs)
    if len(refs) == 0:
        raise ValueError("no inputs to measure novelty against")
    dist, index = [], []
    for start in range(0, len(images), batch):
        d = _pairwise_rms(_flat(images[start : start + batch]), refs)
        best = d.min(dim=1)
        dist.append(best.values)
        index.append(best.indices)
    if not dist:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()


def leave_one_out_distance(inputs, batch: int = 256) -> np.ndarray:
    """Per input, the RMS distance to its nearest *other* input (the domain's own spacing)."""
    refs = _flat(inputs)
    if len(refs) < 2:
        raise ValueError("the inputs' own nearest-neighbour distance needs at least two inputs")
    out = []
    for start in range(0, len(refs), batch):
        d = _pairwise_rms(refs[start : start + batch], refs)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = float("inf")  # leave the input itself out
        out.append(d.min(dim=1).values)
    return torch.cat(out).numpy()


def summarize(distances: np.ndarray) -> dict[str, float]:
    """Mean, min, max and quantiles (q10 … q90; q50 is the median) of a distance sample."""
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        return {"count": 0}
    out = {"count": int(d.size), "mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())}
    out.update({f"q{round(q * 100):02d}": float(np.quantile(d, q)) for q in QUANTILES})
    return out


def novelty(images, inputs, ratio: float = NOVEL_RATIO) -> dict:
    """Nearest-input distances of ``images``, the inputs' own, the threshold and the novel mask.

    Returns ``distance`` and ``nearest`` (per image), ``novel`` (bool per image), ``threshold``
    (ratio × the inputs' median leave-one-out distance), and the summaries ``images`` and
    ``inputs`` of both distributions.
    """
    own = leave_one_out_distance(inputs)
    threshold = ratio * float(np.median(own))
    dist, nearest = nearest_input_distance(images, inputs)
    return {"distance": dist, "nearest": nearest, "novel": dist >= threshold, "threshold": threshold,
            "ratio": ratio, "images": summarize(dist), "inputs": summarize(own)}
