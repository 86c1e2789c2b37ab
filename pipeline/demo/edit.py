"""Part 4 of the demo: h-space editing (Asyrp) through the discs model with a training-free direction
(small → large centred discs), measured per scale (size, kind, position, hue) and its table lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.demo.common import fmt, label_counts, read_images

# The attribute: disc size, which the discs model's h (its 8×8 bottleneck) carries; colour mostly
# goes round the bottleneck through the skip connections, and a red → blue direction barely moves
# the hue. Set A → set B: side ranges (px) of centred discs. Centred, as the paper's aligned
# datasets: a mean difference of h over discs placed anywhere adds a centred blob, which drags
# off-centre discs 2-5 px toward the middle as they grow. Sets A and B share one seed, so their
# colours match pair by pair and Δh holds the size alone; the held-out discs have their own seed.
EDIT_SETS = {"small": (12, 14), "large": (22, 24)}

EDIT_ATTRIBUTE = "side"  # measure_shapes' bounding-box side, px


def edit_folders() -> dict[str, str]:
    """Input folders (under DIR/inputs) of the edit part: set A, set B, the held-out set A images."""
    a, b = EDIT_SETS
    return {"a": f"edit-{a}", "b": f"edit-{b}", "held_out": f"edit-{a}-held-out"}


def hspace_edit(base: str, cfg_dir: Path, overrides: list[str], examples: int, edits: int, opts: dict, out) -> dict:
    """Part 4's jobs: write the two example sets (the same colours) and the held-out set (centred discs),
    `direction fit` (set A = input.uri, set B = hspace.examples) into DIR/edit/direction.safetensors,
    then `edit` the held-out set A images at every scale of configs/demo/edit.yaml (DIR/edit/edited)."""
    from pipeline.config import load_config
    from pipeline.demo.common import run_quietly
    from pipeline.demo.shapes import write_shapes

    started = time.time()
    folders, (a, b) = edit_folders(), EDIT_SETS.values()
    for name, sides, count, seed in (("a", a, examples, 2), ("b", b, examples, 2), ("held_out", a, edits, 4)):
        write_shapes("discs", count, f"{base}/inputs/{folders[name]}", seed=seed, per_shard=64, storage_options=opts,
                     aligned=True, sides=sides)
    common = [f"hspace.direction={base}/edit/direction.safetensors",
              f"hspace.direction_storage_options={json.dumps(opts)}", *overrides]
    fit_cfg = load_config(cfg_dir / "edit.yaml", [f"input.uri={base}/inputs/{folders['a']}", f"output.uri={base}/edit/fit",
                                                  f"hspace.examples={base}/inputs/{folders['b']}", *common])
    fit = run_quietly(fit_cfg, "direction-fit", overwrite=True, out=out)
    cfg = load_config(cfg_dir / "edit.yaml", [f"input.uri={base}/inputs/{folders['held_out']}",
                                              f"output.uri={base}/edit/edited", *common])
    edit = run_quietly(cfg, "edit", overwrite=True, out=out)
    return {"cfg": cfg, "fit": fit, "edit": edit, "seconds": round(time.time() - started, 1)}


def edit_metrics(inputs: np.ndarray, edited: dict[float, np.ndarray], set_a: np.ndarray, set_b: np.ndarray) -> dict:
    """The edit row's figures, by the shape metric: the attribute (mean side of the lit images) of
    sets A and B, of the held-out inputs and of the edits at each scale, and how far each scale went
    from the inputs toward set B (0 = not at all, 1 = set B's mean); what should stay: the share of
    edits that keep their input's kind (disc), and over the pairs where both are lit, the mean
    centroid shift and the median hue error against the input."""
    from pipeline.metrics.shapes import hue_error, measure_shapes

    def mean_side(m):
        lit = m["label"] != "none"
        return float(m[EDIT_ATTRIBUTE][lit].mean()) if lit.any() else None

    src, ma, mb = measure_shapes(inputs), measure_shapes(set_a), measure_shapes(set_b)
    side_in, side_a, side_b = mean_side(src), mean_side(ma), mean_side(mb)
    scales = {}
    for scale, images in edited.items():
        m = measure_shapes(images)
        lit = (src["label"] != "none") & (m["label"] != "none")
        side = mean_side(m)
        span = None if None in (side, side_in, side_b) or side_b == side_in else (side - side_in) / (side_b - side_in)
        scales[scale] = {
            "count": len(images), "mean_side_px": side, "toward_b": span,
            "kind_kept_rate": float((m["label"] == src["label"]).mean()) if len(images) else None,
            "mean_centroid_shift_px": float(np.linalg.norm(m["centroid"] - src["centroid"], axis=1)[lit].mean())
            if lit.any() else None,
            "median_hue_error_deg": float(np.median(hue_error(src["hue"], m["hue"])[lit])) if lit.any() else None,
            "labels": label_counts(m["label"]),
        }
    sides = [v["mean_side_px"] for v in scales.values()]
    grows = all(x is not None for x in sides) and all(x < y for x, y in zip(sides, sides[1:], strict=False))
    return {"attribute": EDIT_ATTRIBUTE, "inputs": len(inputs), "input_mean_side_px": side_in,
            "input_labels": label_counts(src["label"]), "set_a": {"count": len(set_a), "mean_side_px": side_a},
            "set_b": {"count": len(set_b), "mean_side_px": side_b}, "scales": scales, "grows_with_scale": grows}


def measure_edit(jobs: dict, local: Path) -> tuple[dict, list]:
    """Part 4's row of the report (``edit_metrics`` plus the jobs' settings) and its contact-sheet rows:
    the held-out inputs, then their edits at each scale, then set B for reference."""
    from pipeline.data.directions import read_direction
    from pipeline.stages.hspace import edit_schedule

    cfg = jobs["cfg"]
    folders, names = edit_folders(), list(EDIT_SETS)
    read = {k: read_images(local / "inputs" / f) for k, f in folders.items()}
    keys = sorted(read["held_out"])
    members = [cfg.output.image_format] + [f"scale{j}.{cfg.output.image_format}" for j in range(1, len(cfg.hspace.scales))]
    outputs = [read_images(local / "edit" / "edited" / "images", member) for member in members]
    keys = [k for k in keys if all(k in o for o in outputs)]
    empty = np.zeros((0, 32, 32, 3), np.uint8)

    def stack(images):
        return np.stack(images) if images else empty

    inputs = stack([read["held_out"][k] for k in keys])
    edited = {float(s): stack([o[k] for k in keys]) for s, o in zip(cfg.hspace.scales, outputs, strict=True)}
    m = edit_metrics(inputs, edited, stack(list(read["a"].values())), stack(list(read["b"].values())))
    _, header = read_direction(cfg.hspace.direction, cfg.hspace.direction_storage_options)
    applied = edit_schedule(cfg.hspace, header)
    row = {**m, "sets": {"a": names[0], "b": names[1], "sides_px": {n: list(v) for n, v in EDIT_SETS.items()}},
           "method": header["method"], "t0": header["t0"], "steps": cfg.hspace.steps, "t_edit": applied.t_edit,
           "t_boost": applied.t_boost, "delta_norms": header.get("delta_norms"), "direction": cfg.hspace.direction,
           "edited": jobs["edit"].get("images"), "rejected": jobs["edit"].get("rejected"), "folder": "edit/edited",
           "seconds": jobs.get("seconds")}
    sheet = [(f"h-space edit: held-out {names[0]} discs\n(side {fmt(m['input_mean_side_px'], unit=' px')}; "
              f"set B {fmt(m['set_b']['mean_side_px'], unit=' px')})", list(inputs[:16]))]
    for scale, images in edited.items():
        s = m["scales"][scale]
        kept = "n/a" if s["kind_kept_rate"] is None else f"{s['kind_kept_rate']:.0%}"
        sheet.append((f"h-space edit {names[0]} to {names[1]}, scale {scale:g}\nside {fmt(s['mean_side_px'], unit=' px')}, "
                      f"{kept} discs kept", list(images[:16])))
    sheet.append((f"set B: {names[1]} discs\n(the direction's target)", list(read["b"].values())[:16]))
    return row, sheet


def edit_lines(e: dict) -> list[str]:
    a, b = e["sets"]["a"], e["sets"]["b"]
    held_out = f"{e['inputs']} held-out {a} discs"
    lines = [
        f"  h-space edit (Asyrp) through the discs model: {a} → {b} centred discs, mean-difference direction"
        + (f" ({e['seconds']} s)" if e.get("seconds") is not None else ""),
        f"    direction from {e['set_a']['count']} {a} discs (set A, mean side {fmt(e['set_a']['mean_side_px'], unit=' px')})"
        f" and {e['set_b']['count']} {b} (set B, {fmt(e['set_b']['mean_side_px'], unit=' px')}); t0 = {e['t0']}, "
        f"{e['steps']} steps, t_edit {e['t_edit']}, t_boost {e['t_boost']}",
        f"      {held_out:<26}{'side':>9}{'toward B':>10}{'discs kept':>12}{'centroid shift':>16}{'hue error':>11}",
        f"      {'input':<26}{fmt(e['input_mean_side_px'], unit=' px'):>9}",
    ]
    for scale, s in e["scales"].items():
        toward = "n/a" if s["toward_b"] is None else f"{s['toward_b']:.0%}"
        lines.append(f"      {f'scale {float(scale):g}':<26}{fmt(s['mean_side_px'], unit=' px'):>9}{toward:>10}"
                     f"{fmt(s['kind_kept_rate'], pct=True):>12}{fmt(s['mean_centroid_shift_px'], unit=' px'):>16}"
                     f"{fmt(s['median_hue_error_deg'], unit='°'):>11}")
    lines.append(f"      the size grows with the scale: {'yes' if e['grows_with_scale'] else 'NO'}")
    return lines
