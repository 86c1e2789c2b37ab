"""edit: h-space editing (Asyrp): DDIM-invert each image to hspace.t0 with source.model, then the
asymmetric reverse process with the direction in hspace.direction, once per scale in hspace.scales."""

from pipeline.errors import ConfigError
from pipeline.jobs import gallery
from pipeline.runtime.job import Built, Job, image_shards, provenance, source_latents

# what each output sample repeats of its direction's header (the file keeps curves, losses and image ids)
HEADER_KEYS = ("kind", "method", "model", "condition", "t0", "t0_requested", "steps", "grid", "inversion_eps", "t_edit",
               "t_boost", "input", "examples", "count", "count_b", "train", "train_dtype", "source_text", "target_text",
               "text_cosine", "created_at")


def check(cfg) -> None:
    """Before any model loads: the direction file is there and readable and fits source.model's mid block
    (built on the meta device), the scales edit something, t_edit / t_boost resolve (auto: from its LPIPS
    curves) and t_edit lies on the walk; a direction fitted on another model or grid is said in one line."""
    from pipeline.data.directions import read_direction
    from pipeline.errors import StorageError
    from pipeline.jobs.checks import check_condition_fits, check_t_edit_in_grid, source_folder, warn
    from pipeline.stages.hspace import check_direction_fits, edit_schedule, preflight_grid

    h = cfg.hspace
    # refused: scales of only 0 write the unedited reconstruction under every name; [0, s] keeps it as a baseline
    if not any(s != 0 for s in h.scales):
        raise ConfigError(f"config error: hspace.scales = {list(h.scales)}: every scale is 0, so nothing would be "
                          "edited; give a non-zero scale (e.g. [0, 1.0] keeps the unedited image as the baseline)")
    try:
        tensors, header = read_direction(h.direction, h.direction_storage_options)
    except StorageError as exc:
        raise StorageError(f"hspace.direction {exc}") from None
    applied = edit_schedule(h, header)  # from the file and the config alone: said before any model is read
    folder = source_folder(cfg)
    check_condition_fits(cfg, folder)
    check_direction_fits(tensors, header, folder, h)
    grid = preflight_grid(folder, h)
    origin = {None: " (null: the direction file's own)", "auto": " (auto: from the file's LPIPS curves)"}
    check_t_edit_in_grid(applied.t_edit, grid, origin.get(h.t_edit, ""))
    fitted_on = header.get("model")
    if fitted_on and fitted_on != cfg.source.model:  # the shapes fit: maybe a copy of the same model, maybe not
        warn(f"hspace.direction {h.direction} was fitted on {fitted_on!r}, not source.model {cfg.source.model!r}; "
             "its h fits this model's, so the edit runs: fit it on this model if they differ")
    fitted = (header.get("t0"), header.get("steps"), header.get("grid", "schedule"))
    if None not in fitted[:2] and fitted != (grid[0], h.steps, h.grid):
        warn(f"hspace.direction {h.direction} was fitted on a {fitted[2]} grid of {fitted[1]} steps from t0 "
             f"{fitted[0]}; this edit walks its config's {h.grid} grid of {h.steps} steps from t0 {grid[0]} "
             f"(hspace.t0/steps/grid), Δh scaled by {applied.grid_scale:g}"
             + (" and looked up at the nearest fitted timestep" if header["kind"] == "table" else ""))


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
    subruns=(gallery.AFTER_RUN,),  # output.gallery: the gallery of the output after the run
)
