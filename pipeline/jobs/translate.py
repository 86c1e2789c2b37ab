"""translate: the source model encodes, the target model decodes (CycleDiffusion)."""

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
    from pipeline.stages.codec import TranslateStage

    cfg = run.cfg
    ds = model_stage(read_images(run, shards), cfg.runtime, TranslateStage, source=cfg.source, target=cfg.target,
                     sampler=cfg.sampler, output=cfg.output)
    settings = {**sampler_settings(cfg), "source_model": cfg.source.model, "source_condition": cfg.source.condition,
                "source_guidance": cfg.source.guidance_scale, "target_model": cfg.target.model,
                "target_condition": cfg.target.condition, "target_guidance": cfg.target.guidance_scale}
    return Built(ds, provenance(run, settings, source_latents(cfg)))


JOB = Job(
    name="translate",
    command=("translate",),
    help="encode with source.model, decode with target.model (CycleDiffusion); write shards + latents",
    requires=("input.uri", "output.uri", "source.model", "target.model"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    models=("source", "target"),
)
