"""``latentshift ood fit`` and ``ood sample``: unseen-domain synthesis as Ray jobs.

fit:    read → decode → invert to t0 and fit (actor pool) → merge partial fits on the driver
        (moments and a bounded reservoir only) → stats file (+ ID-vs-OOD report with --reference)
sample: draw candidates from N(μ, σ²), keep the geometric matches (driver, cheap), then
        decode the kept latents from t0 on the actor pool → shards, with the ledger's
        exactly-once rules (a re-run is a no-op)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import sys
import time
import uuid

from pipeline.config import JobConfig
from pipeline.data.outputs import OutputStore
from pipeline.data.shards import ShardRef, list_shards
from pipeline.data.stats import read_stats, write_stats
from pipeline.diffusion.ood import (
    MomentFit,
    Reservoir,
    measure_geometry,
    pairwise_distributions,
    point_geometry,
    sample_latents,
    separability,
)
from pipeline.errors import ConfigError, StorageError
from pipeline.run import (
    init_ray,
    model_stage,
    open_output,
    print_summary,
    read_images,
    write_and_commit,
)

log = logging.getLogger(__name__)


def stats_uri(cfg: JobConfig) -> str:
    if cfg.ood.stats:
        return cfg.ood.stats
    if not cfg.output.uri:
        raise ConfigError("config error: ood.stats is not set (and no output.uri to put stats/ under)")
    return posixpath.join(cfg.output.uri.rstrip("/"), "stats", "ood.safetensors")


def fit_hash(cfg: JobConfig, input_uri) -> str:
    """What the fit depends on: a stats file with the same hash is up to date."""
    keys = {"input": input_uri, "model": cfg.source.model, "condition": cfg.source.condition,
            "guidance": cfg.source.guidance_scale, "t0": cfg.ood.t0, "steps": cfg.ood.inversion_steps,
            "variance": cfg.ood.variance, "reservoir": cfg.ood.reservoir, "size": cfg.image.size,
            "resize": cfg.image.resize}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _fit_pass(cfg: JobConfig, input_uri, store: OutputStore, write_latents: bool) -> dict:
    """One streaming pass: invert every image to t0; merge the partial fits the stage forwards.

    Inverted latents (``output.latents``) and rejects are written and committed per input
    shard like any job's outputs; a fit always covers every shard, so nothing is skipped.
    """
    from pipeline.stages.ood import InvertAndFitStage, partial_from_bytes

    shards = list_shards(input_uri, cfg.input.storage_options)
    if not shards:
        raise StorageError(f"{input_uri}: no .tar shards found; check the URI")
    job_cfg = cfg.model_copy(deep=True)
    job_cfg.input.uri = input_uri
    if not write_latents:
        job_cfg.output.latents = "none"
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    state = {"moments": MomentFit(), "reservoir": Reservoir(cfg.ood.reservoir), "shape": None, "timesteps": None}

    def merge(payload: bytes) -> None:
        m, r, shape, grid = partial_from_bytes(payload, cfg.ood.reservoir)
        state["moments"] = state["moments"].merge(m)
        state["reservoir"] = state["reservoir"].merge(r)
        state["shape"] = state["shape"] or (shape or None)
        state["timesteps"] = state["timesteps"] or (grid or None)

    summary = {"shards_done": 0, "images": 0, "rejected": 0, "latent_samples": 0}
    store.remove_tree(store.path("_staging"))
    init_ray()
    ds = model_stage(read_images(job_cfg, shards, store, run_id), job_cfg, InvertAndFitStage)
    write_and_commit(ds, job_cfg, "ood-fit", shards, store, run_id, summary, on_forward=merge)
    if state["moments"].count == 0:
        raise StorageError(f"{input_uri}: no image could be inverted ({summary['rejected']} rejected, "
                           f"see {store.path('_rejects')}); nothing to fit")
    return {"moments": state["moments"], "reservoir": state["reservoir"], "shape": list(state["shape"]),
            "timesteps": state["timesteps"],
            "rejected": summary["rejected"], "latent_samples": summary["latent_samples"], "shards": len(shards)}


def ood_fit(cfg: JobConfig, reference: str | None = None, overwrite: bool = False, out=sys.stdout) -> dict:
    cfg.require("input.uri", "output.uri", "source.model")
    target = stats_uri(cfg)
    store = open_output(cfg)
    list_shards(cfg.input.uri, cfg.input.storage_options)  # fail fast on bad input, before any model
    wanted = fit_hash(cfg, cfg.input.uri)
    if not overwrite and reference is None:
        try:
            _, header = read_stats(target, cfg.output.storage_options)
            if header.get("fit_hash") == wanted:
                out.write(f"ood fit: {target} is up to date (fit {wanted}); nothing to do\n")
                return {"up_to_date": True, "stats": target, **header}
        except StorageError:
            pass
    started = time.time()
    fit = _fit_pass(cfg, cfg.input.uri, store, write_latents=cfg.output.latents != "none")
    moments, reservoir = fit["moments"], fit["reservoir"]
    if fit["timesteps"][0] != cfg.ood.t0:
        log.info("ood.t0 = %d is not on the model's grid; snapped to %d", cfg.ood.t0, fit["timesteps"][0])
    geometry = measure_geometry(reservoir.latents)
    header = {
        "count": moments.count, "t0": fit["timesteps"][0], "t0_requested": cfg.ood.t0,
        "timesteps": fit["timesteps"], "inversion_steps": cfg.ood.inversion_steps, "model": cfg.source.model,
        "condition": cfg.source.condition, "guidance_scale": cfg.source.guidance_scale,
        "variance_kind": cfg.ood.variance, "shape": fit["shape"], "reservoir": len(reservoir.priorities),
        "image_size": cfg.image.size, "input": cfg.input.uri, "rejected": fit["rejected"], "geometry": geometry,
        "latents_written": fit["latent_samples"],
        "fit_hash": wanted, "created_at": time.time(),
    }
    write_stats(target, cfg.output.storage_options, {
        "mean": moments.mean, "variance": moments.variance(cfg.ood.variance),
        "reference": reservoir.latents.contiguous()}, header)
    summary = {"stats": target, **{k: header[k] for k in ("count", "t0", "t0_requested", "rejected")},
               "geometry": geometry, "seconds": round(time.time() - started, 3)}
    if reference is not None:
        summary["report"] = _report(cfg, reference, fit, store)
    out.write(
        f"ood fit: {moments.count} latents at t0 = {header['t0']} ({fit['rejected']} rejected) → {target}\n"
        f"  mean norm {geometry['norm_mean']:.2f} ± {geometry['norm_std']:.2f}, pairwise distance "
        f"{geometry['distance_mean']:.2f} ± {geometry['distance_std']:.2f}, angle at origin "
        f"{geometry['angle_origin_mean']:.2f}°, angle at a point {geometry['angle_point_mean']:.2f}°\n")
    if "report" in summary:
        r = summary["report"]
        out.write(f"  ID vs OOD: mean distance {r['separability']['mean_distance']:.2f} vs d^1/4 = "
                  f"{r['separability']['d_quarter']:.2f} (ratio {r['separability']['ratio']:.2f}) → {r['json']}\n")
    return summary


def _report(cfg: JobConfig, reference: str, ood: dict, store: OutputStore) -> dict:
    """Fit the in-domain reference the same way and compare: JSON + PNG under report/."""
    # the reference's own outputs (ledger, rejects) go under report/reference/: its shard names may
    # repeat the OOD input's
    ref_store = OutputStore(posixpath.join(cfg.output.uri.rstrip("/"), "report", "reference"), cfg.output.storage_options)
    ind = _fit_pass(cfg, reference, ref_store, write_latents=False)
    ood_lat, id_lat = ood["reservoir"].latents, ind["reservoir"].latents
    sep = separability(ood["moments"].mean, ind["moments"].mean)
    stats = {}
    for name, lat in (("ood", ood_lat), ("id", id_lat)):
        raw = pairwise_distributions(lat)
        stats[name] = {"count": (ood if name == "ood" else ind)["moments"].count, "geometry": measure_geometry(lat),
                       "raw": {k: v.tolist() for k, v in raw.items()},
                       "variance": float((ood if name == "ood" else ind)["moments"].variance("isotropic"))}
    cross = point_geometry(ood_lat, id_lat)
    report = {"separability": sep, "ood": {k: v for k, v in stats["ood"].items() if k != "raw"},
              "id": {k: v for k, v in stats["id"].items() if k != "raw"},
              "ood_to_id_distance_mean": float(cross["distance"].mean()),
              "distinguishable": sep["mean_distance"] > sep["d_quarter"],
              "input": cfg.input.uri, "reference": reference, "model": cfg.source.model, "t0": ood["timesteps"][0]}
    png = _report_figure(stats, sep)
    json_path, png_path = store.path("report", "ood_vs_id.json"), store.path("report", "ood_vs_id.png")
    store.put_json(json_path, report)
    store.put(png_path, png)
    report["json"], report["png"] = json_path, png_path
    return report


def _report_figure(stats: dict, sep: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"norm": "norm ‖x‖", "distance": "pairwise distance", "angle_origin": "pairwise angle at origin (°)",
              "angle_point": "angle at a point between two others (°)"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for name, colour in (("id", "tab:blue"), ("ood", "tab:orange")):
            ax.hist(stats[name]["raw"][key], bins=40, alpha=0.6, color=colour, label=name.upper())
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"ID vs OOD latents at t0: ‖μ_OOD − μ_ID‖ = {sep['mean_distance']:.2f}, d^¼ = {sep['d_quarter']:.2f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def ood_sample(cfg: JobConfig, overwrite: bool = False, out=sys.stdout) -> dict:
    import ray.data

    from pipeline.stages.ood import SampleDecodeStage

    cfg.require("output.uri", "source.model")
    source = stats_uri(cfg)
    tensors, header = read_stats(source, cfg.output.storage_options)
    _check_stats(cfg, header, source)
    store = open_output(cfg)
    started = time.time()
    size, count = cfg.ood.shard_size, cfg.ood.count
    names = [f"unseen-{j:05d}" for j in range(math.ceil(count / size))]
    done = set() if overwrite else store.committed()
    todo = [n for n in names if n not in done]
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    summary = {"run_id": run_id, "job": "ood-sample", "shards_total": len(names), "shards_skipped": len(names) - len(todo),
               "shards_done": 0, "images": 0, "rejected": 0, "latent_samples": 0, "config_hash": cfg.config_hash()}
    if todo:
        reference = tensors["reference"].double() if cfg.ood.geometric else None
        result = sample_latents(tensors["mean"], tensors["variance"], count, run_seed=cfg.sampler.seed,
                                reference=reference, geometry=header["geometry"], tolerance=cfg.ood.tolerance)
        summary.update(candidates_drawn=result.drawn, kept=len(result.indices),
                       acceptance_rate=round(result.acceptance_rate, 4), geometric=cfg.ood.geometric)
        store.remove_tree(store.path("_staging"))
        rows = []
        for j, name in enumerate(names):
            chunk = result.indices[j * size : (j + 1) * size]
            if name in todo:
                store.put_json(posixpath.join(store.staging(run_id, name), "expected.json"), {"rows": len(chunk)})
                rows += [{"shard": name, "key": f"{c:09d}", "index": i, "candidate": c} for i, c in enumerate(chunk)]
        init_ray()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(todo)))
        ds = model_stage(ds, cfg, SampleDecodeStage, stats_uri=source, stats_options=cfg.output.storage_options,
                         acceptance=summary["acceptance_rate"])
        write_and_commit(ds, cfg, "ood-sample", [ShardRef(source, n) for n in todo], store, run_id, summary)
    elapsed = time.time() - started
    summary["seconds"] = round(elapsed, 3)
    summary["images_per_second"] = round(summary["images"] / elapsed, 3) if elapsed > 0 else 0.0
    store.put_json(store.path("_ledger", "runs", f"{run_id}.json"), summary)
    print_summary(summary, out)
    if "acceptance_rate" in summary:
        out.write(f"  selection  {'geometric' if cfg.ood.geometric else 'none'}: kept {summary['kept']} of "
                  f"{summary['candidates_drawn']} candidates (acceptance {summary['acceptance_rate']:.2%})\n")
    return summary


def _check_stats(cfg: JobConfig, header: dict, source: str) -> None:
    problems = []
    if header.get("model") != cfg.source.model:
        problems.append(f"it was fitted with model {header.get('model')!r}, not source.model {cfg.source.model!r}")
    if header.get("t0_requested") != cfg.ood.t0:
        problems.append(f"it was fitted at t0 = {header.get('t0_requested')}, not ood.t0 = {cfg.ood.t0}")
    if header.get("inversion_steps") != cfg.ood.inversion_steps:
        problems.append(f"it was fitted with {header.get('inversion_steps')} inversion steps, not {cfg.ood.inversion_steps}")
    if problems:
        raise ConfigError(f"config error: ood.stats {source}: {'; '.join(problems)}; fit it again with `latentshift ood fit`")

