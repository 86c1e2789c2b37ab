"""edit: h-space editing (Asyrp): DDIM-invert each image to hspace.t0 with source.model, then the
asymmetric reverse process with the direction in hspace.direction, once per scale in hspace.scales."""

from pipeline.runtime.job import Built, Job, image_shards, provenance, source_latents

# what each output sample repeats of its direction's header (the file keeps curves, losses and image ids)
HEADER_KEYS = ("kind", "method", "model", "condition", "t0", "t0_requested", "steps", "grid", "inversion_eps", "t_edit",
               "t_boost", "input", "examples", "count", "count_b", "train", "train_dtype", "source_text", "target_text",
               "text_cosine", "created_at")


def check(cfg) -> None:
    """The direction file is there and readable, and t_edit / t_boost resolve (auto: from its LPIPS
    curves), before any model loads."""
    from pipeline.data.directions import read_direction
    from pipeline.stages.hspace import edit_schedule

    _, header = read_direction(cfg.hspace.direction, cfg.hspace.direction_storage_options)
    edit_schedule(cfg.hspace, header)


def build(run, shards):
    from pipeline.data.directions import read_direction
    from pipeline.diffusion.noise import GENERATOR
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.hspace import EditStage, edit_schedule

    cfg, h = run.cfg, run.cfg.hspace
    ds = model_stage(read_images(run, shards), cfg.runtime, EditStage, source=cfg.source, hspace=h,
                     output=cfg.output, seed=cfg.sampler.seed, clip_x0=cfg.sampler.clip_x0)
    _, header = read_direction(h.direction, h.direction_storage_options)
    applied = edit_schedule(h, header)
    names = [cfg.output.image_format] + [f"scale{j}.{cfg.output.image_format}" for j in range(1, len(h.scales))]
    settings = {"method": "asyrp", "source_model": cfg.source.model, "source_condition": cfg.source.condition,
                "source_guidance": cfg.source.guidance_scale, "direction": h.direction,
                "direction_header": {k: header[k] for k in HEADER_KEYS if k in header},
                "scales": list(h.scales), "scale_members": dict(zip(names, h.scales, strict=True)),
                "t0_requested": h.t0, "steps": h.steps, "grid": h.grid, "inversion_eps": h.inversion_eps,
                "t_edit": applied.t_edit, "t_boost": applied.t_boost, "t_edit_setting": h.t_edit,
                "t_boost_setting": h.t_boost, "lpips_edit_threshold": h.lpips_edit_threshold,
                "boost_curve": h.boost_curve, "lpips_boost_threshold": h.boost_threshold,
                "grid_scale": applied.grid_scale, "eta_boost": 1.0,  # η = 1 at every t < t_boost, edit steps too; else 0
                "seed": cfg.sampler.seed, "clip_x0": cfg.sampler.clip_x0, "noise": GENERATOR}
    return Built(ds, provenance(run, settings, source_latents(cfg, "ddim")))


JOB = Job(
    name="edit",
    command=("edit",),
    help="h-space edit (Asyrp): invert, then the asymmetric reverse process with hspace.direction at hspace.scales",
    requires=("input.uri", "output.uri", "source.model", "hspace.direction"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    models=("source",),
    check=check,
)
