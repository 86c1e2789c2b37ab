"""``latentshift demo``: the whole pipeline on the bundled shape models, with numbers.

1. generate 256 discs and 64 triangles as shards (DIR/inputs/…)
2. translate the discs with the discs model → squares model (CycleDiffusion; DIR/translated)
3. fit OOD statistics of the triangles through the discs model and synthesize 64 unseen-domain
   images with geometric selection (DIR/unseen), and without it (DIR/unseen-plain-gaussian)
4. DIR/report.png (contact sheet), DIR/report.json, and a table on stdout
"""

from __future__ import annotations

import io
import json
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


def _read_images(folder: str | Path) -> dict[str, np.ndarray]:
    from PIL import Image

    from pipeline.data.shards import iter_tar_samples

    out = {}
    for tar in sorted(Path(folder).glob("*.tar")):
        with open(tar, "rb") as f:
            for s in iter_tar_samples(f):
                if not isinstance(s, Exception) and "png" in s.members:
                    out[s.key] = np.asarray(Image.open(io.BytesIO(s.members["png"])).convert("RGB"))
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
    from PIL import Image, ImageDraw

    cell, label_w = 32 * scale + 4, 190
    sheet = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell + 8), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        y = 4 + r * cell
        draw.text((6, y + cell // 2 - 6), title, fill=(230, 230, 230))
        for c, img in enumerate(images[:per_row]):
            tile = Image.fromarray(img).resize((32 * scale, 32 * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + c * cell + 2, y + 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def run_demo(out_dir: str | Path, discs: int = 256, triangles: int = 64, unseen: int = 64,
             models: dict | None = None, steps: int | None = None, s3_endpoint: str | None = None,
             out=sys.stdout) -> dict:
    from pipeline.config import load_config
    from pipeline.demo.shapes import write_shapes
    from pipeline.jobs import run_job
    from pipeline.metrics.shapes import shape_rate
    from pipeline.runtime.ray_env import init_ray

    started = time.time()
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
    step(f"1/4 generating {discs} discs and {triangles} triangles")
    write_shapes("discs", discs, f"{base}/inputs/discs", seed=0, per_shard=64, storage_options=opts)
    write_shapes("triangles", triangles, f"{base}/inputs/triangles", seed=1, per_shard=64, storage_options=opts)

    step("2/4 translating discs → squares (discs model encodes, squares model decodes)")
    tcfg = load_config(cfg_dir / "translate.yaml", [f"input.uri={base}/inputs/discs", f"output.uri={base}/translated",
                                                     f"source.model={models['discs']}", f"target.model={models['squares']}",
                                                     *common])
    t_summary = run_job(tcfg, "translate", overwrite=True, out=out)

    step("3/4 unseen-domain synthesis: fit triangles through the discs model, sample with and without geometry")
    ucfg = load_config(cfg_dir / "unseen.yaml", [f"input.uri={base}/inputs/triangles", f"output.uri={base}/unseen",
                                                  f"source.model={models['discs']}", f"ood.count={unseen}",
                                                  f"ood.shard_size={unseen}", *so,
                                                  *([f"ood.inversion_steps={steps}"] if steps else [])])
    fit = run_job(ucfg, "ood-fit", overwrite=True, out=out)
    geo = run_job(ucfg, "ood-sample", overwrite=True, out=out)
    plain_cfg = ucfg.model_copy(deep=True)
    plain_cfg.ood.geometric = False
    plain_cfg.ood.stats = fit["stats"]
    plain_cfg.output.uri = f"{base}/unseen-plain-gaussian"
    nogeo = run_job(plain_cfg, "ood-sample", overwrite=True, out=out)

    step("4/4 measuring and writing the report")
    local = _localise(base, opts, out_dir) if s3_endpoint else out_dir
    sources = _read_images(local / "inputs" / "discs")
    translated = _read_images(local / "translated" / "images")
    tri_inputs = _read_images(local / "inputs" / "triangles")
    synth = _read_images(local / "unseen" / "images")
    synth_plain = _read_images(local / "unseen-plain-gaussian" / "images")
    plain = plain_samples(models["discs"], unseen, steps or 50)
    tm = translation_metrics(sources, translated, "squares")
    report = {
        "translation": {**tm, "mean_psnr": t_summary.get("mean_psnr"), "mean_ssim": t_summary.get("mean_ssim"),
                        "images": t_summary["images"], "rejected": t_summary["rejected"]},
        "unseen": {
            "triangle_rate_geometric": shape_rate(np.stack(list(synth.values())), "triangles") if synth else 0.0,
            "triangle_rate_gaussian_only": shape_rate(np.stack(list(synth_plain.values())), "triangles") if synth_plain else 0.0,
            "triangle_rate_plain_discs_model": shape_rate(plain, "triangles"),
            "disc_rate_plain_discs_model": shape_rate(plain, "discs"),
            "acceptance_rate": geo.get("acceptance_rate"), "count": len(synth),
            "fit_count": fit.get("count"), "t0": fit.get("t0"),
        },
        "targets": {"translation_target_shape_rate": 0.8, "median_hue_error_deg": 15, "median_centroid_shift_px": 2},
        "seconds": round(time.time() - started, 1), "models": models, "out": str(out_dir),
        "gaussian_only_images": nogeo["images"],
    }
    keys = sorted(set(sources) & set(translated))[:16]
    sheet = contact_sheet([
        ("source discs", [sources[k] for k in keys]),
        ("translated (squares model)", [translated[k] for k in keys]),
        ("triangle inputs (OOD)", list(tri_inputs.values())[:16]),
        ("unseen: Gaussian + geometry", list(synth.values())[:16]),
        ("unseen: Gaussian only", list(synth_plain.values())[:16]),
        ("plain discs-model samples", list(plain[:16])),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.png").write_bytes(sheet)
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


def format_table(r: dict) -> str:
    t, u = r["translation"], r["unseen"]
    lines = [
        "",
        "latentshift demo — results",
        "  translation discs → squares (CycleDiffusion, two independently trained models)",
        f"    target-shape rate      {_fmt(t.get('target_shape_rate'), pct=True):>8}   (target ≥ 80%)",
        f"    median hue error       {_fmt(t.get('median_hue_error_deg'), unit='°'):>8}   (target ≤ 15°)",
        f"    median centroid shift  {_fmt(t.get('median_centroid_shift_px'), unit=' px'):>8}   (target ≤ 2 px)",
        f"    PSNR / SSIM vs source  {_fmt(t.get('mean_psnr'), unit=' dB')} / {_fmt(t.get('mean_ssim'))}",
        "  unseen-domain synthesis (triangles, through the discs-only model)",
        f"    triangle rate, Gaussian + geometric selection  {_fmt(u['triangle_rate_geometric'], pct=True)}"
        f"  (acceptance {_fmt(u.get('acceptance_rate'), pct=True)})",
        f"    triangle rate, Gaussian only                   {_fmt(u['triangle_rate_gaussian_only'], pct=True)}",
        f"    triangle rate, plain discs-model samples       {_fmt(u['triangle_rate_plain_discs_model'], pct=True)}",
        f"  report: {r['out']}/report.png, report.json   ({r['seconds']} s)",
        "",
    ]
    return "\n".join(lines)
