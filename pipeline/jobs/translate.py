"""translate: the source model encodes, the target model decodes (CycleDiffusion)."""

from pipeline.jobs import gallery
from pipeline.runtime.job import (
    Built,
    Job,
    image_shards,
    provenance,
    sampler_settings,
    source_latents,
)


def check(cfg) -> None:
    """score.inline: the CLIP checkpoint key and both texts, before any model loads."""
    if cfg.score.inline:
        from pipeline.jobs.checks import check_scoring

        check_scoring(cfg.clip, cfg.score, cfg.source, cfg.target)


def build(run, shards):
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.codec import TranslateStage

    cfg = run.cfg
    ds = model_stage(read_images(run, shards), cfg.runtime, TranslateStage, source=cfg.source, target=cfg.target,
                     sampler=cfg.sampler, output=cfg.output, score=cfg.score, clip=cfg.clip)
    settings = {**sampler_settings(cfg), "source_model": cfg.source.model, "source_condition": cfg.source.condition,
                "source_guidance": cfg.source.guidance_scale, "target_model": cfg.target.model,
                "target_condition": cfg.target.condition, "target_guidance": cfg.target.guidance_scale}
    if cfg.score.inline:  # what the clip_score / directional of each sample were measured with
        from pipeline.metrics.scorer import score_texts

        source_text, target_text = score_texts(cfg.score, cfg.source, cfg.target)
        settings["score"] = {"clip_model": cfg.clip.model, "clip_pretrained": cfg.clip.pretrained,
                             "clip_antialias": cfg.clip.antialias,
                             "source_text": source_text, "target_text": target_text, "templates": cfg.score.templates}
    return Built(ds, provenance(run, settings, source_latents(cfg)))


JOB = Job(
    name="translate",
    command=("translate",),
    help="encode with source.model, decode with target.model (CycleDiffusion); write shards + latents",
    requires=("input.uri", "output.uri", "source.model", "target.model"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    commits=("images", "latents", "scores", "rejects"),  # scores/: with score.inline
    models=("source", "target"),
    check=check,
    subruns=(gallery.AFTER_RUN,),  # output.gallery: the gallery of the output after the run
)
