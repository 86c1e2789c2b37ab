"""score: CLIP score and directional CLIP of an existing output, as ``scores/<shard>.parquet``.

Its units are the output's committed image shards (``images/<shard>.tar`` with a ``_ledger/<shard>.json``
record); with ``input.uri`` each output sample is paired by key with the input image of the input
shard of the same basename (directional CLIP), without it only the CLIP score is measured. It writes
no image: its ledger, claims, staging and rejects live under ``<output>/_score/``, so it never meets
the records of the job that made the images, and a re-run skips the shards it scored.
"""

from pipeline.runtime.job import Built, Job, committed_image_shards, image_shards, provenance

CONTROL = "_score"


def directional(cfg) -> bool:
    """Directional CLIP needs the input images: measured when input.uri is set."""
    return bool(cfg.input.uri)


def check(cfg) -> None:
    from pipeline.jobs.checks import check_scoring

    check_scoring(cfg.clip, cfg.score, cfg.source, cfg.target, directional(cfg))


def prepare(run) -> None:
    """The input shards by basename, listed before any model loads (a bad input.uri fails here)."""
    cfg = run.cfg
    run.state["inputs"] = ({s.name: s.uri for s in image_shards(cfg.input.uri, cfg.input.storage_options)}
                           if directional(cfg) else None)


def build(run, shards):
    import ray.data

    from pipeline.metrics.scorer import score_texts
    from pipeline.runtime.ray_env import model_stage
    from pipeline.stages.images import decode_pairs
    from pipeline.stages.read import read_pairs
    from pipeline.stages.score import ScoreStage

    cfg = run.cfg
    ds = ray.data.from_items([{"uri": s.uri, "name": s.name} for s in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(read_pairs, fn_kwargs={"storage_options": cfg.output.storage_options,
                                            "input_uris": run.state["inputs"],
                                            "input_storage_options": cfg.input.storage_options, "ledger": run.ledger})
    ds = ds.map_batches(decode_pairs, batch_format="numpy", batch_size=cfg.runtime.batch_size,
                        fn_kwargs={"size": cfg.image.size, "resize": cfg.image.resize,
                                   "max_pixels": cfg.image.max_pixels, "exif_transpose": cfg.image.exif_transpose})
    ds = model_stage(ds, cfg.runtime, ScoreStage, clip=cfg.clip, score=cfg.score, source=cfg.source,
                     target=cfg.target, directional=directional(cfg))
    source_text, target_text = score_texts(cfg.score, cfg.source, cfg.target, directional(cfg))
    settings = {"clip_model": cfg.clip.model, "clip_pretrained": cfg.clip.pretrained,
                "clip_antialias": cfg.clip.antialias, "source_text": source_text,
                "target_text": target_text, "templates": cfg.score.templates, "input": cfg.input.uri or None}
    return Built(ds, provenance(run, settings))


JOB = Job(
    name="score",
    command=("score",),
    help="CLIP score and directional CLIP of an existing output (clip.pretrained, score.*): scores/<shard>.parquet",
    requires=("output.uri", "clip.pretrained"),
    units=committed_image_shards,
    build=build,
    commits=("scores", "rejects"),
    check=check,
    prepare=prepare,
    control=CONTROL,
)
