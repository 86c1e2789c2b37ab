"""encode: images → latents with the source model (DPM-Encoder, or DDIM inversion)."""

from pipeline.runtime.job import (
    Built,
    Job,
    image_shards,
    provenance,
    sampler_settings,
    source_latents,
)


def build(run, shards):
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.codec import EncodeStage

    cfg = run.cfg
    ds = model_stage(read_images(run, shards), cfg.runtime, EncodeStage, source=cfg.source, sampler=cfg.sampler,
                     output=cfg.output)
    settings = {**sampler_settings(cfg), "source_model": cfg.source.model, "source_condition": cfg.source.condition}
    return Built(ds, provenance(run, settings, source_latents(cfg)))


JOB = Job(
    name="encode",
    command=("encode",),
    help="write latents only (sampler.method dpm, or ddim to the t0 that strength sets)",
    requires=("input.uri", "output.uri", "source.model"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    models=("source",),
    commits=("latents", "rejects"),
)
