"""decode: stored latents (an encode run's output) → images with the target model."""

import posixpath

from pipeline.data.shards import ShardRef
from pipeline.errors import StorageError
from pipeline.runtime.job import Built, Job, provenance


def latent_shards(cfg) -> list[ShardRef]:
    """Latent Parquet files of an encode run (its output.uri, or its latents/ folder)."""
    from pipeline.data.latents import latent_files

    uri = cfg.input.uri
    _, files = latent_files(uri, cfg.input.storage_options)
    if not files:
        raise StorageError(f"{uri}: no latent .parquet files (give the output.uri of an encode run, or its latents/ folder)")
    proto = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    return [ShardRef(proto + p, posixpath.basename(p)[: -len(".parquet")]) for p in files]


def build(run, shards):
    from pipeline.runtime.ray_env import model_stage, read_latent_files
    from pipeline.stages.codec import DecodeStage

    cfg = run.cfg
    ds = model_stage(read_latent_files(run, shards), cfg.runtime, DecodeStage, target=cfg.target,
                     refine_steps=cfg.sampler.refine_steps, clip_x0=cfg.sampler.clip_x0)
    settings = {"target_model": cfg.target.model, "target_condition": cfg.target.condition,
                "target_guidance": cfg.target.guidance_scale, "refine_steps": cfg.sampler.refine_steps,
                "clip_x0": cfg.sampler.clip_x0}
    return Built(ds, provenance(run, settings))


JOB = Job(
    name="decode",
    command=("decode",),
    help="decode a latents dataset (input.uri = an encode run's output.uri) with target.model",
    requires=("input.uri", "output.uri", "target.model"),
    units=latent_shards,
    build=build,
    models=("target",),
    commits=("images", "rejects"),
)
