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


EVAL_REFERENCES = (("squares", "the target domain: real squares"), ("discs", "the control: the source discs"))


def edge_network(path) -> str:
    """The demo's feature network, a documented stand-in for the 95 MB Inception network it does not ship:
    a ``tiny-conv`` of fixed weights. Three strided box filters on luminance bring the 299² input back near the
    shapes' own 32² scale (a bias of 1 keeps the normalised luminance positive through the ReLUs); then Sobel
    filters at 0°, 90°, 45° and 135°, each sign through its own ReLU; averaged over the image and scaled to
    unit length: 8 features, the share of the image's edge energy in each orientation. Blind to hue and
    contrast by construction (a random network mostly measures colour, which a translation keeps), it tells a
    square's two edge directions from a disc's all. Written with its weights, so runs compare."""
    import torch

    from pipeline.metrics.feature_net import TINY, TinyFeatures, save

    box = torch.full((3, 3), 1.0 / 9)
    sobel = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 4
    diagonal = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, -1.0, -2.0]]) / 4
    luminance = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, on the normalised channels
    widths = [1, 1, 1, 8]
    net = TinyFeatures(widths, unit=True)
    with torch.no_grad():
        for conv in (net.layers.conv0, net.layers.conv1, net.layers.conv2, net.layers.conv3):
            conv.bias.zero_()
        net.layers.conv0.weight.copy_(box[None, None] * luminance[None, :, None, None])
        net.layers.conv0.bias.fill_(1.0)  # normalised luminance in [−1, 1] → [0, 2]: the ReLU passes it
        net.layers.conv1.weight.copy_(box[None, None])
        net.layers.conv2.weight.copy_(box[None, None])
        edges = [sign * k for k in (sobel, sobel.T, diagonal, diagonal.flip(1)) for sign in (1.0, -1.0)]
        net.layers.conv3.weight.copy_(torch.stack(edges)[:, None])
    return save(net, path, TINY, {"widths": widths, "unit": True})


def judge_translation(base: str, opts: dict, net_path: str, count: int, runtime: dict, out) -> dict:
    """`latentshift eval` of the translated images against real squares (the target domain) and against the
    source discs (the control), with the demo's edge-orientation network (``edge_network``). At this scale
    (hundreds of 64² images, 8 features) the figures say which reference the translation is closer to; they
    are not on the scale of the papers' Inception FIDs."""
    from pipeline.config import validate
    from pipeline.demo.common import run_quietly
    from pipeline.demo.shapes import write_shapes

    write_shapes("squares", count, f"{base}/inputs/squares", seed=2, per_shard=64, storage_options=opts)
    rows = {}
    for name, _ in EVAL_REFERENCES:
        cfg = validate({"output": {"uri": f"{base}/translated", "storage_options": opts}, "runtime": runtime,
                        "eval": {"reference": f"{base}/inputs/{name}", "reference_storage_options": opts,
                                 "inception": net_path, "name": name}})
        s = run_quietly(cfg, "eval", out=out)
        rows[name] = {"fid": s["fid"], "kid": s["kid"], "kid_std": s["kid_std"], "images": s["evaluated"],
                      "reference_images": s["reference_count"]}
    return {"network": "edge orientation (tiny-conv, fixed Sobel filters): a stand-in, pipeline/demo/translation.py",
            "references": rows}


def fid_lines(row: dict) -> list[str]:
    refs = row["references"]
    figures = ", ".join(f"vs {name} {refs[name]['fid']:.3g} / {refs[name]['kid']:.3g}" for name, _ in EVAL_REFERENCES)
    return [f"    FID / KID              {figures}   (lower vs squares: closer to the target)",
            "                           (8 edge-orientation features standing in for Inception: not the papers' scale)"]
