"""Part 2 of the demo, measured: discs translated by the discs model → squares model (CycleDiffusion),
by the shape metric (target-shape rate, hue error, centroid shift)."""

from __future__ import annotations

import numpy as np

from pipeline.demo.common import label_counts


def translation_metrics(sources: dict, outputs: dict, target_shape: str) -> dict:
    from pipeline.metrics.shapes import hue_error, measure_shapes

    keys = sorted(set(sources) & set(outputs))
    if not keys:
        return {"pairs": 0}
    a = measure_shapes(np.stack([sources[k] for k in keys]))
    b = measure_shapes(np.stack([outputs[k] for k in keys]))
    lit = (a["label"] != "none") & (b["label"] != "none")
    shift = np.linalg.norm(a["centroid"] - b["centroid"], axis=1)
    return {
        "pairs": len(keys),
        "target_shape_rate": float((b["label"] == target_shape).mean()),
        "source_shape_kept_rate": float((b["label"] == a["label"]).mean()),
        "median_hue_error_deg": float(np.median(hue_error(a["hue"], b["hue"])[lit])) if lit.any() else None,
        "median_centroid_shift_px": float(np.median(shift[lit])) if lit.any() else None,
        "output_labels": label_counts(b["label"]),
    }
