"""``latentshift demo``: the whole pipeline on the bundled shape models, with numbers.

1. generate 256 discs, and 64 triangles for each OOD domain of ``OOD_DOMAINS`` (aligned: the
   paper's setting; unaligned: the documented limit), as shards (DIR/inputs/…)
2. translate the discs with the discs model → squares model (CycleDiffusion; DIR/translated)
3. per OOD domain: fit OOD statistics of the triangles through the discs model
   (DIR/unseen/<domain>/fit) and synthesize 64 images with every mode of ``SAMPLING_MODES``
   (DIR/unseen/<domain>/<mode>)
4. h-space editing (Asyrp) through the discs model: a mean-difference direction from small to large
   centred discs (``EDIT_SETS``, DIR/inputs/edit-*; `direction fit` → DIR/edit/direction.safetensors),
   then `edit` of held-out small discs at each of configs/demo/edit.yaml's scales (DIR/edit/edited)
5. guidance in latent space (CycleDiffusion) through the discs model: `guide` with the offline hue
   energy (configs/demo/guide.yaml), unguided (0 Langevin steps) and guided on the same seeds
   (DIR/guide/unguided, DIR/guide/guided)
6. measure: plain discs-model samples, an invert→decode reconstruction gate per fit, triangle
   rate and novelty (nearest-input distance) per mode, the edits' size, kind, position and hue
   per scale, the guided images' hue error to the target and disc rate against the unguided ones;
   DIR/report.png (contact sheet), DIR/report.json, and a table on stdout
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def demo_config_dir() -> Path:
    for candidate in (Path.cwd() / "configs" / "demo", ROOT / "configs" / "demo"):
        if (candidate / "translate.yaml").exists():
            return candidate
    raise FileNotFoundError("configs/demo/ not found: run the demo from the project folder")


def _read_images(folder: str | Path, member: str = "png") -> dict[str, np.ndarray]:
    from PIL import Image

    from pipeline.data.shards import iter_tar_samples

    out = {}
    for tar in sorted(Path(folder).glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(f):
                if not isinstance(s, Exception) and member in s.members:
                    out[s.key] = np.asarray(Image.open(io.BytesIO(s.members[member])).convert("RGB"))
    return out


def plain_samples(model: str, count: int, steps: int, seed: int = 0, eta: float = 1.0) -> np.ndarray:
    """Unconditional samples of a model (what it makes without any guidance).

    η = 1 is DDPM's own ancestral sampler on a ``steps``-long subsequence. The deterministic
    DDIM sampler (η = 0) lays bare these small models' errors at high noise (washed-out colours,
    tinted backgrounds); the fresh noise of every ancestral step corrects much of them.
    """
    import torch

    from pipeline.data.model_store import resolve_model
    from pipeline.diffusion import load_denoiser, per_sample_noise, sample_seed
    from pipeline.diffusion.sampling import denoise
    from pipeline.stages.tensors import to_uint8

    den = load_denoiser(resolve_model(model))
    grid = den.schedule.grid(steps)
    noise = per_sample_noise([sample_seed(seed, f"plain/{i}") for i in range(count)], (1 + len(grid), 3, 32, 32))
    noise[:, -1] = 0  # the last step lands on x0 without noise, as DDPM's sampler does at t = 0
    with torch.no_grad():
        x0 = denoise(den, noise[:, 0], grid, eta=eta, noise=noise[:, 1:] if eta > 0 else None)
        return to_uint8(den.to_pixels(x0))


def quality_gate(model: str, shape: str, count: int = 256, steps: int = 50) -> dict:
    """Share of ``count`` unconditional samples the shape metric labels as ``shape`` (gate: ≥ 90%)."""
    from pipeline.metrics.shapes import measure_shapes

    labels = measure_shapes(plain_samples(model, count, steps))["label"].astype(str)
    values, counts = np.unique(labels, return_counts=True)
    return {"model": model, "shape": shape, "samples": count, "steps": steps,
            "rate": float((labels == shape).mean()), "labels": dict(zip(values.tolist(), counts.tolist(), strict=True))}


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
        "output_labels": {k: int(v) for k, v in zip(*np.unique(b["label"].astype(str), return_counts=True), strict=True)},
    }


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], per_row: int = 16, scale: int = 3) -> bytes:
    """Rows of up to ``per_row`` tiles, each after its title (which may run to several lines)."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = 32 * scale + 4
    label_w = max([190] + [int(measure.multiline_textbbox((0, 0), title)[2]) + 14 for title, _ in rows])
    sheet = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell + 8), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        y = 4 + r * cell
        text_h = measure.multiline_textbbox((0, 0), title)[3]
        draw.multiline_text((6, y + (cell - text_h) // 2), title, fill=(230, 230, 230))
        for c, img in enumerate(images[:per_row]):
            tile = Image.fromarray(img).resize((32 * scale, 32 * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + c * cell + 2, y + 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# ---- part 3: unseen-domain synthesis, its rows and modes ------------------------------------

# OOD domains: name → (title, aligned). The paper's own domains (AFHQ, CelebA-HQ, LSUN) are
# aligned or centred, so the aligned row is the main one; the unaligned row documents the limit
# (its shape varies in position and size, so it is not in a Gaussian's first two moments).
OOD_DOMAINS = {
    "aligned": ("aligned triangles (centred 20 px box, hue varies)", True),
    "unaligned": ("unaligned triangles (position, 12-24 px size, hue vary)", False),
}
MAIN_DOMAIN = "aligned"

# The candidate modes of `ood sample`: (name, config overrides on configs/demo/unseen.yaml).
# Adding a mode to the demo is one entry here. A mode whose overrides change what the fit
# depends on (t0, variance, clip_x0, …: ``fit_hash``) gets a fit of its own.
SAMPLING_MODES: list[tuple[str, list[str]]] = [
    ("gaussian + geometric selection", ["ood.geometric=true"]),
    ("gaussian only", ["ood.geometric=false"]),
    # the official sampler: slerp from real latents (weight chosen by the geometry), scalar variance,
    # window selection (calibrated: the official windows are sized for 3·256² latents)
    ("slerp, official", ["ood.candidates=slerp", "ood.variance=scalar", "ood.selection=window"]),
    ("gaussian + geometric optimisation", ["ood.optimise_steps=10", "ood.geometric=false"]),
    # a control: slerp at k = 1 is 20/21 a real latent; where copying can be told apart, the
    # report must flag it as near-copies
    ("slerp k = 1 (control)", ["ood.candidates=slerp", "ood.slerp_weight=0.047619047619047616", "ood.geometric=false"]),
]

TARGETS = {"translation_target_shape_rate": 0.8, "median_hue_error_deg": 15, "median_centroid_shift_px": 2,
           "unseen_best_novel_triangle_rate": 0.5, "reconstruction_gate_triangle_rate": 0.95,
           # part 5, the guided row: the share of images within GUIDE_WITHIN_DEG of the target hue, and the
           # share still discs (measured: 98 % and 92 % of 48 seeds; unguided 10 % and 88 %)
           "guide_within_rate": 0.8, "guide_disc_rate": 0.8}


def slug(name: str) -> str:
    """A mode's folder name: 'gaussian + geometric selection' → 'gaussian-geometric-selection'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def input_folder(domain: str) -> str:
    return f"triangles-{domain}"


def synthesize(domain: str, base: str, cfg_dir: Path, overrides: list[str], out) -> dict:
    """Part 3's jobs for one OOD domain: its fit, then one `ood sample` run per mode (measured later).

    The domain's own fit (the config without mode overrides) goes to unseen/<domain>/fit; a mode
    that needs another fit gets unseen/<domain>/fit-<fit hash>; samples go to unseen/<domain>/<mode>.
    """
    from pipeline.config import load_config
    from pipeline.jobs import run_job
    from pipeline.jobs.ood_fit import fit_hash

    folders = [slug(name) for name, _ in SAMPLING_MODES]
    if len(set(folders)) < len(folders) or "fit" in folders:
        raise ValueError(f"SAMPLING_MODES names must give distinct folders other than 'fit', got {folders}")
    root = f"{base}/unseen/{domain}"
    domain_overrides = [f"input.uri={base}/inputs/{input_folder(domain)}", *overrides]
    fits: dict[str, dict] = {}

    def fit_for(cfg) -> str:
        key = fit_hash(cfg)
        if key not in fits:
            fit_cfg = cfg.model_copy(deep=True)
            fit_cfg.output.uri = f"{root}/fit" if not fits else f"{root}/fit-{key}"
            fits[key] = {"cfg": fit_cfg, "summary": run_job(fit_cfg, "ood-fit", overwrite=True, out=out)}
        return key

    main_fit = fit_for(load_config(cfg_dir / "unseen.yaml", domain_overrides))
    modes = {}
    for name, mode_overrides in SAMPLING_MODES:
        cfg = load_config(cfg_dir / "unseen.yaml", [*domain_overrides, *mode_overrides])
        key = fit_for(cfg)
        cfg.ood.stats = fits[key]["summary"]["stats"]
        cfg.output.uri = f"{root}/{slug(name)}"
        modes[name] = {"fit": key, "overrides": list(mode_overrides), "folder": f"unseen/{domain}/{slug(name)}",
                       "summary": run_job(cfg, "ood-sample", overwrite=True, out=out)}
    return {"main_fit": main_fit, "fits": fits, "modes": modes}


def reconstruction_gate(cfg, inputs: np.ndarray, batch: int = 64) -> dict:
    """Invert the OOD inputs through the source model to the fit's t0 on the OOD jobs' grid
    (``ood_grid``) and decode them back (DDIM, η = 0, x̂0 as ``sampler.clip_x0``): the share that
    is still a triangle. Passes at ≥ 95%.

    Sampling the fitted Gaussian can only give what the model decodes from t0; a model that
    cannot even bring the inputs themselves back from there is too weak for the domain, and the
    gate names it, so a failed synthesis is not blamed on the sampler.
    """
    from pipeline.diffusion import ddim_decode_model_space, ddim_invert_model_space
    from pipeline.diffusion.ood import ood_grid
    from pipeline.metrics.shapes import shape_rate
    from pipeline.stages.base import load_model
    from pipeline.stages.tensors import to_model_range, to_uint8

    den = load_model(cfg.source, cfg.runtime.dtype, cfg.sampler.clip_x0)  # as the OOD stages load it
    grid = ood_grid(den.schedule, cfg.ood.t0, cfg.ood.inversion_steps)
    cond = {"condition": cfg.source.condition, "guidance_scale": cfg.source.guidance_scale}
    decoded = []
    for start in range(0, len(inputs), batch):
        x0 = den.to_model_space(to_model_range(inputs[start : start + batch]))
        z = ddim_invert_model_space(den, x0, timesteps=grid, **cond)
        decoded.append(to_uint8(den.to_pixels(ddim_decode_model_space(den, z, **cond))))
    rate = shape_rate(np.concatenate(decoded), "triangles") if decoded else 0.0
    need = TARGETS["reconstruction_gate_triangle_rate"]
    passed = rate >= need
    verdict = "pass" if passed else (
        f"FAIL: model {cfg.source.model} is too weak for this domain: invert→decode at t0 = {grid[0]} keeps "
        f"{rate:.1%} triangles (< {need:.0%}), so its samples cannot show the claim")
    return {"model": cfg.source.model, "t0": grid[0], "steps": len(grid), "clip_x0": cfg.sampler.clip_x0,
            "images": len(inputs), "triangle_rate": rate, "target": need, "passed": passed, "verdict": verdict}


def hue_concentration(images: np.ndarray) -> float | None:
    """Mean resultant length of the images' hues: 0 = spread round the colour wheel, 1 = one hue.

    Candidates scatter around μ, whose colour is the inputs' average; this shows how far the
    synthesized colours collapse toward it, beside the inputs' own value.
    """
    from pipeline.metrics.shapes import measure_shapes

    m = measure_shapes(images)
    lit = m["label"] != "none"
    if not lit.any():
        return None
    angle = np.deg2rad(m["hue"][lit])
    return float(np.hypot(np.cos(angle).mean(), np.sin(angle).mean()))


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels.astype(str), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def mode_metrics(images: np.ndarray, inputs: np.ndarray) -> dict:
    """One mode's figures: triangle rate, novelty against the inputs, and the two together.

    A novel triangle is a triangle whose nearest input is at least half the inputs' own median
    nearest-neighbour distance away (``pipeline.metrics.novelty``); a mode where most images are
    not novel is flagged as making near-copies of its inputs, not synthesizing.
    """
    from pipeline.metrics.novelty import novelty
    from pipeline.metrics.shapes import measure_shapes

    if len(images) == 0:
        return {"count": 0, "triangle_rate": 0.0, "novel_rate": 0.0, "novel_triangle_rate": 0.0,
                "near_copies": False, "nearest_input_distance": {"count": 0}, "hue_concentration": None, "labels": {}}
    labels = measure_shapes(images)["label"]
    triangle = labels == "triangles"
    nov = novelty(images, inputs)
    novel_rate = float(nov["novel"].mean())
    return {"count": len(images), "triangle_rate": float(triangle.mean()), "novel_rate": novel_rate,
            "novel_triangle_rate": float((triangle & nov["novel"]).mean()), "near_copies": novel_rate < 0.5,
            "nearest_input_distance": nov["images"], "hue_concentration": hue_concentration(images),
            "labels": _label_counts(labels)}


def measure_domain(domain: str, jobs: dict, local: Path) -> tuple[dict, list]:
    """One OOD domain's row of the report (gate, novelty scale, every mode) and its contact-sheet rows."""
    from pipeline.metrics.novelty import NOVEL_RATIO, leave_one_out_distance, summarize

    title, aligned = OOD_DOMAINS[domain]
    inputs = np.stack(list(_read_images(local / "inputs" / input_folder(domain)).values()))
    own = leave_one_out_distance(inputs)
    fits = {}
    for key, fit in jobs["fits"].items():
        cfg, s = fit["cfg"], fit["summary"]
        fits[key] = {"t0": s.get("t0"), "t0_requested": cfg.ood.t0, "inversion_steps": cfg.ood.inversion_steps,
                     "variance": cfg.ood.variance, "clip_x0": cfg.sampler.clip_x0, "count": s.get("count"),
                     "stats": s.get("stats"), "gate": reconstruction_gate(cfg, inputs)}
    modes, sheet = {}, [(f"{domain}: OOD inputs", list(inputs[:16]))]
    for name, job in jobs["modes"].items():
        images = list(_read_images(local / job["folder"] / "images").values())
        m = mode_metrics(np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8), inputs)
        modes[name] = {**m, "acceptance_rate": job["summary"].get("acceptance_rate"), "fit": job["fit"],
                       "overrides": job["overrides"]}
        sheet.append((f"{domain}: {name}\n{m['triangle_rate']:.0%} triangles, "
                      f"{m['novel_triangle_rate']:.0%} novel", images[:16]))
    synthesizing = [n for n in modes if not modes[n]["near_copies"]] or list(modes)  # copies are never the best
    best = max(synthesizing, key=lambda n: modes[n]["novel_triangle_rate"])
    row = {"title": title, "aligned": aligned, "role": "main" if domain == MAIN_DOMAIN else "limit",
           "inputs": len(inputs), "fit": jobs["main_fit"], "fits": fits, "gate": fits[jobs["main_fit"]]["gate"],
           "inputs_nearest_neighbour_distance": summarize(own), "novelty_ratio": NOVEL_RATIO,
           "novelty_threshold": NOVEL_RATIO * float(np.median(own)), "hue_concentration_inputs": hue_concentration(inputs),
           "modes": modes, "best_mode": best, "best_novel_triangle_rate": modes[best]["novel_triangle_rate"],
           "target_met": modes[best]["novel_triangle_rate"] >= TARGETS["unseen_best_novel_triangle_rate"]}
    return row, sheet


# ---- part 4: h-space editing (Asyrp) with a training-free direction ------------------------

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
    from pipeline.demo.shapes import write_shapes
    from pipeline.jobs import run_job

    started = time.time()
    folders, (a, b) = edit_folders(), EDIT_SETS.values()
    for name, sides, count, seed in (("a", a, examples, 2), ("b", b, examples, 2), ("held_out", a, edits, 4)):
        write_shapes("discs", count, f"{base}/inputs/{folders[name]}", seed=seed, per_shard=64, storage_options=opts,
                     aligned=True, sides=sides)
    common = [f"hspace.direction={base}/edit/direction.safetensors",
              f"hspace.direction_storage_options={json.dumps(opts)}", *overrides]
    fit_cfg = load_config(cfg_dir / "edit.yaml", [f"input.uri={base}/inputs/{folders['a']}", f"output.uri={base}/edit/fit",
                                                  f"hspace.examples={base}/inputs/{folders['b']}", *common])
    fit = run_job(fit_cfg, "direction-fit", overwrite=True, out=out)
    cfg = load_config(cfg_dir / "edit.yaml", [f"input.uri={base}/inputs/{folders['held_out']}",
                                              f"output.uri={base}/edit/edited", *common])
    edit = run_job(cfg, "edit", overwrite=True, out=out)
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
            "labels": _label_counts(m["label"]),
        }
    sides = [v["mean_side_px"] for v in scales.values()]
    grows = all(x is not None for x in sides) and all(x < y for x, y in zip(sides, sides[1:], strict=False))
    return {"attribute": EDIT_ATTRIBUTE, "inputs": len(inputs), "input_mean_side_px": side_in,
            "input_labels": _label_counts(src["label"]), "set_a": {"count": len(set_a), "mean_side_px": side_a},
            "set_b": {"count": len(set_b), "mean_side_px": side_b}, "scales": scales, "grows_with_scale": grows}


def measure_edit(jobs: dict, local: Path) -> tuple[dict, list]:
    """Part 4's row of the report (``edit_metrics`` plus the jobs' settings) and its contact-sheet rows:
    the held-out inputs, then their edits at each scale, then set B for reference."""
    from pipeline.data.directions import read_direction
    from pipeline.stages.hspace import edit_schedule

    cfg = jobs["cfg"]
    folders, names = edit_folders(), list(EDIT_SETS)
    read = {k: _read_images(local / "inputs" / f) for k, f in folders.items()}
    keys = sorted(read["held_out"])
    members = [cfg.output.image_format] + [f"scale{j}.{cfg.output.image_format}" for j in range(1, len(cfg.hspace.scales))]
    outputs = [_read_images(local / "edit" / "edited" / "images", member) for member in members]
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
    sheet = [(f"h-space edit: held-out {names[0]} discs\n(side {_fmt(m['input_mean_side_px'], unit=' px')}; "
              f"set B {_fmt(m['set_b']['mean_side_px'], unit=' px')})", list(inputs[:16]))]
    for scale, images in edited.items():
        s = m["scales"][scale]
        kept = "n/a" if s["kind_kept_rate"] is None else f"{s['kind_kept_rate']:.0%}"
        sheet.append((f"h-space edit {names[0]} to {names[1]}, scale {scale:g}\nside {_fmt(s['mean_side_px'], unit=' px')}, "
                      f"{kept} discs kept", list(images[:16])))
    sheet.append((f"set B: {names[1]} discs\n(the direction's target)", list(read["b"].values())[:16]))
    return row, sheet


# ---- part 5: guidance in latent space (CycleDiffusion) with an offline energy -----------------

GUIDE_WITHIN_DEG = 30.0  # a guided image reaches the target when its hue is this close (shape metric)


def guide_runs(base: str, cfg_dir: Path, overrides: list[str], count: int, out) -> dict:
    """Part 5's jobs: `guide` twice with configs/demo/guide.yaml on image numbers 0 … count − 1, so on the
    same seeds and the same z⁽⁰⁾: unguided (guide.langevin_steps 0: G(z⁽⁰⁾), the plain decode of the
    initial latent; DIR/guide/unguided) and guided (DIR/guide/guided). Whatever differs between the
    two rows, column by column, is the Langevin walk's doing."""
    from pipeline.config import load_config
    from pipeline.jobs import run_job

    started = time.time()
    runs = {}
    for name, extra in (("unguided", ["guide.langevin_steps=0"]), ("guided", [])):
        cfg = load_config(cfg_dir / "guide.yaml", [f"output.uri={base}/guide/{name}", f"guide.count={count}",
                                                   *overrides, *extra])
        runs[name] = {"cfg": cfg, "summary": run_job(cfg, "guide", overwrite=True, out=out)}
    return {**runs, "seconds": round(time.time() - started, 1)}


def guide_metrics(unguided: np.ndarray, guided: np.ndarray, target_hue: float,
                  within_deg: float = GUIDE_WITHIN_DEG) -> dict:
    """The guide row's figures, by the shape metric, for two stacks of images on the same seeds (row i
    of each from one z⁽⁰⁾): per stack the median and mean hue error to ``target_hue`` over its lit
    images, the share of all its images within ``within_deg`` of it (an unlit image is not), the disc
    rate (the shape kept) and the mean side of the lit ones; over the seeds lit in both, the mean drop
    of the hue error and the share of seeds that guidance brought closer."""
    from pipeline.metrics.shapes import hue_error, measure_shapes

    def one(images):
        m = measure_shapes(images)
        lit = m["label"] != "none"
        err = hue_error(m["hue"], target_hue)
        return lit, err, {
            "count": len(images),
            "median_hue_error_deg": float(np.median(err[lit])) if lit.any() else None,
            "mean_hue_error_deg": float(err[lit].mean()) if lit.any() else None,
            "within_rate": float((lit & (err <= within_deg)).mean()) if len(images) else None,
            "disc_rate": float((m["label"] == "discs").mean()) if len(images) else None,
            "mean_side_px": float(m["side"][lit].mean()) if lit.any() else None,
            "labels": _label_counts(m["label"]),
        }

    lit_u, err_u, u = one(unguided)
    lit_g, err_g, g = one(guided)
    both = lit_u & lit_g
    return {"target_hue_deg": float(target_hue), "within_deg": float(within_deg), "unguided": u, "guided": g,
            "pairs": int(both.sum()),
            "mean_hue_error_drop_deg": float((err_u - err_g)[both].mean()) if both.any() else None,
            "closer_rate": float((err_g < err_u)[both].mean()) if both.any() else None}


def measure_guide(jobs: dict, local: Path) -> tuple[dict, list]:
    """Part 5's row of the report (``guide_metrics`` plus the settings and the targets) and its two
    contact-sheet rows, unguided above guided, the same seed in each column."""
    cfg = jobs["guided"]["cfg"]
    g = cfg.guide
    read = {name: _read_images(local / "guide" / name / "images") for name in ("unguided", "guided")}
    keys = sorted(set(read["unguided"]) & set(read["guided"]))
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    stacks = {name: np.stack([images[k] for k in keys]) if keys else empty for name, images in read.items()}
    m = guide_metrics(stacks["unguided"], stacks["guided"], g.target_hue)
    targets = {"within_rate": TARGETS["guide_within_rate"], "disc_rate": TARGETS["guide_disc_rate"]}
    met = {k: m["guided"][k] is not None and m["guided"][k] >= v for k, v in targets.items()}
    row = {**m, "energy": g.energy, "weight": g.weight, "step_size": g.step_size, "langevin_steps": g.langevin_steps,
           "steps": cfg.sampler.steps, "eta": cfg.sampler.eta, "clip_x0": cfg.sampler.clip_x0,
           "model": cfg.source.model, "seed": cfg.sampler.seed, "targets": targets, "target_met": met,
           "images": {name: jobs[name]["summary"].get("images") for name in ("unguided", "guided")},
           "folders": {"unguided": "guide/unguided", "guided": "guide/guided"}, "seconds": jobs.get("seconds")}
    u, gd = m["unguided"], m["guided"]

    def title(m):  # ASCII only: the contact sheet's default font may lack λ and °
        return f"hue error median {_fmt(m['median_hue_error_deg'], unit=' deg')}, {_fmt(m['disc_rate'], pct=True)} discs"

    sheet = [(f"guidance: unguided, G(z0)\n{title(u)}", list(stacks["unguided"][:16])),
             (f"guided toward hue {g.target_hue:g} deg, same seeds\n(weight {g.weight:g}, {g.langevin_steps} Langevin "
              f"steps)\n{title(gd)}",
              list(stacks["guided"][:16]))]
    return row, sheet


def run_demo(out_dir: str | Path, discs: int = 256, triangles: int = 64, unseen: int = 64,
             models: dict | None = None, steps: int | None = None, s3_endpoint: str | None = None,
             domains: list[str] | None = None, edit_examples: int = 48, edits: int = 32, guides: int = 16,
             out=sys.stdout) -> dict:
    """The demo into ``out_dir``; ``domains`` picks OOD rows of ``OOD_DOMAINS`` (default: all);
    ``edit_examples`` discs in each of the edit part's sets A and B, ``edits`` held-out ones edited
    (0: no edit part); ``guides`` seeds of the guide part, each unguided and guided (0: no guide part)."""
    from pipeline.config import load_config
    from pipeline.demo.shapes import write_shapes
    from pipeline.jobs import run_job
    from pipeline.metrics.shapes import measure_shapes, shape_rate
    from pipeline.runtime.ray_env import init_ray

    started = time.time()
    domains = list(domains or OOD_DOMAINS)
    unknown = [d for d in domains if d not in OOD_DOMAINS]
    if unknown:
        raise ValueError(f"unknown OOD domain(s) {unknown}; known: {', '.join(OOD_DOMAINS)}")
    out_dir = Path(out_dir).resolve()
    models = {"discs": "bundled:discs", "squares": "bundled:squares", **(models or {})}
    cfg_dir = demo_config_dir()
    if s3_endpoint:
        base, opts = "s3://latentshift-demo", {"endpoint_url": s3_endpoint}
    else:
        base, opts = str(out_dir), {}
    so = [f"input.storage_options={json.dumps(opts)}", f"output.storage_options={json.dumps(opts)}"]
    common = [*so, *([f"sampler.steps={steps}"] if steps else [])]

    def step(msg):
        out.write(f"[demo {time.time() - started:6.1f}s] {msg}\n")
        out.flush()

    init_ray()
    step(f"1/6 generating {discs} discs and {triangles} triangles per OOD domain ({', '.join(domains)})")
    write_shapes("discs", discs, f"{base}/inputs/discs", seed=0, per_shard=64, storage_options=opts)
    for domain in domains:
        write_shapes("triangles", triangles, f"{base}/inputs/{input_folder(domain)}", seed=1, per_shard=64,
                     storage_options=opts, aligned=OOD_DOMAINS[domain][1])

    step("2/6 translating discs → squares (discs model encodes, squares model decodes)")
    tcfg = load_config(cfg_dir / "translate.yaml", [f"input.uri={base}/inputs/discs", f"output.uri={base}/translated",
                                                     f"source.model={models['discs']}", f"target.model={models['squares']}",
                                                     *common])
    t_summary = run_job(tcfg, "translate", overwrite=True, out=out)

    ood_overrides = [f"source.model={models['discs']}", f"ood.count={unseen}", f"ood.shard_size={unseen}", *so,
                     *([f"ood.inversion_steps={steps}"] if steps else [])]
    jobs = {}
    for domain in domains:
        step(f"3/6 unseen-domain synthesis, {OOD_DOMAINS[domain][0]}: fit through the discs model, sample "
             f"{len(SAMPLING_MODES)} modes ({'; '.join(n for n, _ in SAMPLING_MODES)})")
        jobs[domain] = synthesize(domain, base, cfg_dir, ood_overrides, out)

    edit_jobs = None
    if edits:
        a, b = EDIT_SETS
        step(f"4/6 h-space edit (Asyrp) through the discs model: direction {a} → {b} centred discs from "
             f"{edit_examples} + {edit_examples} examples, edit {edits} held-out {a} discs")
        edit_overrides = [f"source.model={models['discs']}", *so, *([f"hspace.steps={steps}"] if steps else [])]
        edit_jobs = hspace_edit(base, cfg_dir, edit_overrides, edit_examples, edits, opts, out)

    guide_jobs = None
    if guides:
        step(f"5/6 guidance in latent space (CycleDiffusion) through the discs model: {guides} seeds unguided, then "
             "guided by the hue energy (configs/demo/guide.yaml)")
        guide_jobs = guide_runs(base, cfg_dir, [f"source.model={models['discs']}", *common], guides, out)

    step("6/6 measuring (shapes, reconstruction gates, novelty, edits, guidance) and writing the report")
    local = _localise(base, opts, out_dir) if s3_endpoint else out_dir
    sources = _read_images(local / "inputs" / "discs")
    translated = _read_images(local / "translated" / "images")
    plain = plain_samples(models["discs"], unseen, steps or 50)
    tm = translation_metrics(sources, translated, "squares")
    keys = sorted(set(sources) & set(translated))[:16]
    sheet = [("source discs", [sources[k] for k in keys]), ("translated (squares model)", [translated[k] for k in keys]),
             ("plain discs-model samples", list(plain[:16]))]
    rows = {}
    for domain in domains:
        rows[domain], domain_sheet = measure_domain(domain, jobs[domain], local)
        sheet += domain_sheet
    edit_row = None
    if edit_jobs:
        edit_row, edit_sheet = measure_edit(edit_jobs, local)
        sheet += edit_sheet
    guide_row = None
    if guide_jobs:
        guide_row, guide_sheet = measure_guide(guide_jobs, local)
        sheet += guide_sheet
    plain_labels = _label_counts(measure_shapes(plain)["label"])
    report = {
        "translation": {**tm, "mean_psnr": t_summary.get("mean_psnr"), "mean_ssim": t_summary.get("mean_ssim"),
                        "images": t_summary["images"], "rejected": t_summary["rejected"]},
        "unseen": {
            "count": unseen, "main_domain": MAIN_DOMAIN, "modes": [[n, list(o)] for n, o in SAMPLING_MODES],
            "plain_discs_model": {"count": len(plain), "steps": steps or 50, "triangle_rate": shape_rate(plain, "triangles"),
                                  "disc_rate": shape_rate(plain, "discs"), "labels": plain_labels},
            "domains": rows,
        },
        "edit": edit_row,
        "guide": guide_row,
        "targets": TARGETS,
        "seconds": round(time.time() - started, 1), "models": models, "out": str(out_dir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.png").write_bytes(contact_sheet(sheet))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    out.write(format_table(report))
    return report


def _localise(base: str, opts: dict, out_dir: Path) -> Path:
    """Copy the demo's S3 outputs to out_dir for measuring (the --s3 variant)."""
    from pipeline.data.filesystems import url_to_fs

    fs, root = url_to_fs(base, opts)
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if rel.endswith(".tar"):
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(dest))
    return out_dir


def _fmt(v, pct=False, unit=""):
    if v is None:
        return "n/a"
    return f"{v:.1%}" if pct else f"{v:.2f}{unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_table(r: dict) -> str:
    t, u, targets = r["translation"], r["unseen"], r["targets"]
    plain = u["plain_discs_model"]
    lines = [
        "",
        "latentshift demo — results",
        "  translation discs → squares (CycleDiffusion, two independently trained models)",
        f"    target-shape rate      {_fmt(t.get('target_shape_rate'), pct=True):>8}   (target ≥ 80%)",
        f"    median hue error       {_fmt(t.get('median_hue_error_deg'), unit='°'):>8}   (target ≤ 15°)",
        f"    median centroid shift  {_fmt(t.get('median_centroid_shift_px'), unit=' px'):>8}   (target ≤ 2 px)",
        f"    PSNR / SSIM vs source  {_fmt(t.get('mean_psnr'), unit=' dB')} / {_fmt(t.get('mean_ssim'))}",
        f"  unseen-domain synthesis through the discs-only model ({u['count']} images per mode)",
        f"    plain discs-model samples: triangles {_fmt(plain['triangle_rate'], pct=True)}, "
        f"discs {_fmt(plain['disc_rate'], pct=True)}",
    ]
    for name, d in u["domains"].items():
        lines += _domain_lines(name, d, targets)
    if r.get("edit"):
        lines += _edit_lines(r["edit"])
    if r.get("guide"):
        lines += _guide_lines(r["guide"])
    lines += [f"  report: {r['out']}/report.png, report.json   ({r['seconds']} s)", ""]
    return "\n".join(lines)


def _domain_lines(name: str, d: dict, targets: dict) -> list[str]:
    gate, fit = d["gate"], d["fits"][d["fit"]]
    own = d["inputs_nearest_neighbour_distance"]
    role = "the main row" if d["role"] == "main" else "the documented limit"
    lines = [
        f"    {d['title']}: {role} (t0 = {fit['t0']}, x̂0 clip {fit['clip_x0']}, {d['inputs']} inputs)",
        f"      invert→decode gate  {_fmt(gate['triangle_rate'], pct=True):>7} triangles (target ≥ "
        f"{gate['target']:.0%})  {gate['verdict']}",
        f"      inputs' own nearest-neighbour distance: median {own.get('q50', 0):.3f} → novel when ≥ "
        f"{d['novelty_threshold']:.3f}; hue concentration of the inputs {_fmt(d['hue_concentration_inputs'])}",
        f"      {'mode':<34}{'triangles':>10}{'novel tri.':>11}{'accepted':>10}   "
        f"{'NN to inputs q10/q50/q90':<26}{'hue conc.':>9}",
    ]
    for mode, m in d["modes"].items():
        nn = m["nearest_input_distance"]
        spread = f"{nn['q10']:.3f} / {nn['q50']:.3f} / {nn['q90']:.3f}" if nn.get("count") else "n/a"
        copies = "  near-copies of the inputs" if m["near_copies"] else ""
        lines.append(f"      {mode:<34}{_fmt(m['triangle_rate'], pct=True):>10}{_fmt(m['novel_triangle_rate'], pct=True):>11}"
                     f"{_fmt(m.get('acceptance_rate'), pct=True):>10}   {spread:<26}{_fmt(m['hue_concentration']):>9}{copies}")
    need = targets["unseen_best_novel_triangle_rate"]
    verdict = f"(target ≥ {need:.0%}) {_met(d['target_met'])}" if d["role"] == "main" else "(no target: the limit)"
    lines.append(f"      best: {d['best_mode']}, {_fmt(d['best_novel_triangle_rate'], pct=True)} novel triangles  {verdict}")
    return lines


def _edit_lines(e: dict) -> list[str]:
    a, b = e["sets"]["a"], e["sets"]["b"]
    held_out = f"{e['inputs']} held-out {a} discs"
    lines = [
        f"  h-space edit (Asyrp) through the discs model: {a} → {b} centred discs, mean-difference direction"
        + (f" ({e['seconds']} s)" if e.get("seconds") is not None else ""),
        f"    direction from {e['set_a']['count']} {a} discs (set A, mean side {_fmt(e['set_a']['mean_side_px'], unit=' px')})"
        f" and {e['set_b']['count']} {b} (set B, {_fmt(e['set_b']['mean_side_px'], unit=' px')}); t0 = {e['t0']}, "
        f"{e['steps']} steps, t_edit {e['t_edit']}, t_boost {e['t_boost']}",
        f"      {held_out:<26}{'side':>9}{'toward B':>10}{'discs kept':>12}{'centroid shift':>16}{'hue error':>11}",
        f"      {'input':<26}{_fmt(e['input_mean_side_px'], unit=' px'):>9}",
    ]
    for scale, s in e["scales"].items():
        toward = "n/a" if s["toward_b"] is None else f"{s['toward_b']:.0%}"
        lines.append(f"      {f'scale {float(scale):g}':<26}{_fmt(s['mean_side_px'], unit=' px'):>9}{toward:>10}"
                     f"{_fmt(s['kind_kept_rate'], pct=True):>12}{_fmt(s['mean_centroid_shift_px'], unit=' px'):>16}"
                     f"{_fmt(s['median_hue_error_deg'], unit='°'):>11}")
    lines.append(f"      the size grows with the scale: {'yes' if e['grows_with_scale'] else 'NO'}")
    return lines


def _guide_lines(g: dict) -> list[str]:
    u, gd, within = g["unguided"], g["guided"], f"within {g['within_deg']:g}°"
    targets, met = g["targets"], g["target_met"]
    lines = [
        f"  guidance in latent space (CycleDiffusion) through the discs model: {g['energy']} energy toward "
        f"{g['target_hue_deg']:g}°" + (f" ({g['seconds']} s)" if g.get("seconds") is not None else ""),
        f"    λ {g['weight']:g}, s {g['step_size']:g}, {g['langevin_steps']} Langevin steps, {g['steps']}-step decoder "
        f"grid, η {g['eta']:g}, x̂0 clip {g['clip_x0']}; {u['count']} seeds, each unguided (G(z0)) and guided",
        f"      {'':<12}{'hue error median':>17}{'mean':>9}{within:>13}{'discs':>8}{'side':>10}",
    ]
    for name, m in (("unguided", u), ("guided", gd)):
        lines.append(f"      {name:<12}{_fmt(m['median_hue_error_deg'], unit='°'):>17}{_fmt(m['mean_hue_error_deg'], unit='°'):>9}"
                     f"{_fmt(m['within_rate'], pct=True):>13}{_fmt(m['disc_rate'], pct=True):>8}"
                     f"{_fmt(m['mean_side_px'], unit=' px'):>10}")
    closer = "n/a" if g["closer_rate"] is None else f"{g['closer_rate']:.0%}"
    lines += [
        f"      guided closer to the target than unguided on {closer} of {g['pairs']} seeds, mean hue error "
        f"down {_fmt(g['mean_hue_error_drop_deg'], unit='°')}",
        f"      guided {within} {_fmt(gd['within_rate'], pct=True)} (target ≥ {targets['within_rate']:.0%}) "
        f"{_met(met['within_rate'])}; discs {_fmt(gd['disc_rate'], pct=True)} (target ≥ {targets['disc_rate']:.0%}) "
        f"{_met(met['disc_rate'])}",
    ]
    return lines
