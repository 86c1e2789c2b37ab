"""ood fit: DDIM-invert out-of-domain images to t0 with the source model and fit a Gaussian there
(Unseen Image Synthesis, seed 003).

read → decode → invert to t0 and fit (actor pool) → the driver merges partial fits (moments,
and the latents that enter a bounded reservoir) → stats file; with ``--reference``, the
in-domain shards are fitted the same way (a sub-run under report/reference/, handed over in
memory) and an ID-vs-OOD report is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath

from pipeline.errors import ConfigError, StorageError
from pipeline.runtime.job import (
    Built,
    Job,
    Option,
    SubRun,
    image_shards,
    provenance,
    source_latents,
)

log = logging.getLogger(__name__)


def stats_uri(cfg) -> str:
    if cfg.ood.stats:
        return cfg.ood.stats
    if not cfg.output.uri:
        raise ConfigError("config error: ood.stats is not set (and no output.uri to put stats/ under)")
    return posixpath.join(cfg.output.uri.rstrip("/"), "stats", "ood.safetensors")


def fit_hash(cfg) -> str:
    """What the fit depends on: a stats file with the same hash is up to date."""
    keys = {"input": cfg.input.uri, "model": cfg.source.model, "condition": cfg.source.condition,
            "guidance": cfg.source.guidance_scale, "t0": cfg.ood.t0, "steps": cfg.ood.inversion_steps,
            "variance": cfg.ood.variance, "reservoir": cfg.ood.reservoir, "size": cfg.image.size,
            "resize": cfg.image.resize, "clip_x0": cfg.sampler.clip_x0}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def prepare(run):
    """Up to date (same fit hash in the stats file, no report asked for): nothing to do."""
    from pipeline.data.stats import read_stats

    cfg, target = run.cfg, stats_uri(run.cfg)
    if run.options.get("overwrite") or run.options.get("reference"):
        return None
    try:
        _, header = read_stats(target, cfg.output.storage_options)
    except StorageError:
        return None
    if header.get("fit_hash") != fit_hash(cfg):
        return None
    run.out.write(f"ood fit: {target} is up to date (fit {header['fit_hash']}); nothing to do\n")
    return {"up_to_date": True, "stats": target, **header}


def build(run, shards):
    from pipeline.diffusion.ood import MomentFit, Reservoir
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.ood import InvertAndFitStage, partial_from_bytes

    cfg, state = run.cfg, run.state
    state.update(moments=MomentFit(), reservoir=Reservoir(cfg.ood.reservoir), shape=None, timesteps=None)

    def merge(payload: bytes) -> None:
        m, r, shape, grid = partial_from_bytes(payload, cfg.ood.reservoir)
        state["moments"] = state["moments"].merge(m)
        state["reservoir"] = state["reservoir"].merge(r)
        state["shape"] = state["shape"] or (list(shape) or None)
        state["timesteps"] = state["timesteps"] or (grid or None)

    ds = model_stage(read_images(run, shards), cfg.runtime, InvertAndFitStage, source=cfg.source, ood=cfg.ood,
                     output=cfg.output, clip_x0=cfg.sampler.clip_x0)
    settings = {"method": "ddim", "t0_requested": cfg.ood.t0, "inversion_steps": cfg.ood.inversion_steps,
                "source_model": cfg.source.model, "source_condition": cfg.source.condition,
                "clip_x0": cfg.sampler.clip_x0}
    return Built(ds, provenance(run, settings, source_latents(cfg, "ddim")), on_partial=merge)


def finish(run) -> None:
    """Write the stats file (and the report): mean, variance, the reservoir, their geometry."""
    import time

    from pipeline.data.stats import write_stats
    from pipeline.diffusion.ood import measure_geometry

    cfg, state, s = run.cfg, run.state, run.summary
    moments, reservoir = state["moments"], state["reservoir"]
    if moments.count == 0:
        raise StorageError(f"{cfg.input.uri}: no image could be inverted ({s['rejected']} rejected, "
                           f"see {run.store.path('_rejects')}); nothing to fit")
    t0 = state["timesteps"][0]
    if t0 != cfg.ood.t0:
        log.info("ood.t0 = %d is not on the model's grid; snapped to %d", cfg.ood.t0, t0)
    geometry = measure_geometry(reservoir.latents)
    header = {
        "count": moments.count, "t0": t0, "t0_requested": cfg.ood.t0, "timesteps": state["timesteps"],
        "inversion_steps": cfg.ood.inversion_steps, "model": cfg.source.model, "condition": cfg.source.condition,
        "guidance_scale": cfg.source.guidance_scale, "variance_kind": cfg.ood.variance, "shape": state["shape"],
        "reservoir": len(reservoir.priorities), "image_size": cfg.image.size, "input": cfg.input.uri,
        "rejected": s["rejected"], "geometry": geometry, "latents_written": s["latent_samples"],
        "fit_hash": fit_hash(cfg), "clip_x0": cfg.sampler.clip_x0, "created_at": time.time(),
    }
    target = stats_uri(cfg)
    write_stats(target, cfg.output.storage_options, {
        "mean": moments.mean.numpy(), "variance": moments.variance(cfg.ood.variance).numpy(),
        "reference": reservoir.latents.contiguous().numpy()}, header)
    s.update(stats=target, count=moments.count, t0=t0, t0_requested=cfg.ood.t0, geometry=geometry)


def reference_config(run, cfg):
    """With ``--reference``: the in-domain shards, fitted the same way in a sub-run whose outputs (ledger,
    rejects, stats) go under report/reference/ (``cfg``'s output.uri): its shard names may repeat the
    OOD input's."""
    if not run.options.get("reference"):
        return None
    cfg.input.uri, cfg.ood.stats, cfg.output.latents = run.options["reference"], None, "none"
    return cfg


def report_against(run, reference) -> None:
    """The ID-vs-OOD report, from this run's fit and the reference sub-run's, both in memory."""
    from pipeline.jobs.ood_report import write_report

    run.summary["report"] = write_report(run, reference)


def summary_lines(s: dict) -> list[str]:
    if "stats" not in s:
        return []
    g = s["geometry"]
    lines = [f"  fit        {s['count']} latents at t0 = {s['t0']} → {s['stats']}",
             f"  geometry   mean norm {g['norm_mean']:.2f} ± {g['norm_std']:.2f}, pairwise distance "
             f"{g['distance_mean']:.2f} ± {g['distance_std']:.2f}, angle at origin {g['angle_origin_mean']:.2f}°, "
             f"angle at a point {g['angle_point_mean']:.2f}°"]
    if "report" in s:
        sep = s["report"]["separability"]
        lines.append(f"  ID vs OOD  mean distance {sep['mean_distance']:.2f} vs d^1/4 = {sep['d_quarter']:.2f} "
                     f"(ratio {sep['ratio']:.2f}) → {s['report']['json']}")
    return lines


JOB = Job(
    name="ood-fit",
    command=("ood", "fit"),
    help="DDIM-invert input.uri to ood.t0 with source.model; write Gaussian statistics to ood.stats",
    requires=("input.uri", "output.uri", "source.model"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    models=("source",),
    commits=("latents", "rejects", "stats", "report"),
    summary=summary_lines,
    skip_committed=False,  # the fit covers every shard of its input, every time
    prepare=prepare,
    finish=finish,
    options=(Option("--reference", "in-domain shards: also fit them and write an ID-vs-OOD report", "URI"),),
    # after the finish: the OOD stats file is written whatever becomes of the reference fit
    subruns=(SubRun("report/reference", reference_config, report_against, after="finish"),),
)
