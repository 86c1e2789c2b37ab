"""search: the official zero-shot protocol of CycleDiffusion at scale: per input, every (trial, encoder
scale, skip) DPM-encoded once with source.model under source.condition, decoded at every decoder scale
under target.condition, ranked by directional CLIP on the device; the best (search.top_k) are written."""

from pipeline.errors import ConfigError
from pipeline.jobs import gallery
from pipeline.runtime.job import Built, Job, image_shards, provenance


def check(cfg) -> None:
    """One text-conditional model, the dpm encoder, a grid that fits sampler.steps, a CLIP checkpoint that loads
    into clip.model: before any model loads."""
    from pipeline.jobs.checks import check_scoring, require_text_model
    from pipeline.stages.search import search_grid

    if cfg.target.model not in (None, cfg.source.model):
        raise ConfigError(f"config error: target.model = {cfg.target.model!r}: the zero-shot search decodes with "
                          f"source.model under target.condition; leave target.model unset or equal to source.model")
    if cfg.sampler.method != "dpm":
        raise ConfigError("config error: sampler.method = ddim: the zero-shot search draws fresh DPM-Encoder noise "
                          "per trial; use sampler.method: dpm")
    try:
        # refused, not warned: a skip of sampler.steps or more leaves its candidates no step to walk
        grid = search_grid(cfg.search, cfg.sampler)
    except ValueError as exc:
        raise ConfigError(f"config error: search.{exc}; a skip leaves that many grid steps out") from None
    if cfg.search.top_k > len(grid):
        raise ConfigError(f"config error: search.top_k = {cfg.search.top_k} is more than the {len(grid)} candidates "
                          "the grid makes per input")
    # the candidates are decoded under target.condition, a prompt: an unconditional or class model cannot take it
    require_text_model(cfg, "the zero-shot search encodes and decodes under text prompts (source.condition, "
                            "target.condition)")
    check_scoring(cfg.clip, cfg.score, cfg.source, cfg.target)  # the ranking: both texts and the CLIP checkpoint


def build(run, shards):
    from pipeline.diffusion.noise import GENERATOR
    from pipeline.metrics.scorer import score_texts
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.search import SearchStage, search_grid

    cfg = run.cfg
    source_text, target_text = score_texts(cfg.score, cfg.source, cfg.target)
    ds = model_stage(read_images(run, shards), cfg.runtime, SearchStage, source=cfg.source, target=cfg.target,
                     sampler=cfg.sampler, search=cfg.search, score=cfg.score, clip=cfg.clip, output=cfg.output)
    grid = search_grid(cfg.search, cfg.sampler)
    settings = {"method": "zero-shot search", "model": cfg.source.model, "source_condition": cfg.source.condition,
                "source_guidance_scales": list(cfg.search.encoder_scales), "target_condition": cfg.target.condition,
                "search": grid.as_dict(), "candidates_per_input": len(grid), "top_k": cfg.search.top_k,
                "stop_score": cfg.search.stop_score, "ranking": "directional CLIP", "clip_model": cfg.clip.model,
                "clip_antialias": cfg.clip.antialias, "ranked_clamped": cfg.search.clamp,
                "source_text": source_text, "target_text": target_text, "text_templates": cfg.score.templates,
                "eta": cfg.sampler.eta, "steps": cfg.sampler.steps, "seed": cfg.sampler.seed,
                "clip_x0": cfg.sampler.clip_x0, "noise": GENERATOR,
                "seeds": "sample_seed = candidate_seed(sample_seed(seed, shard/key), trial, encoder scale, skip)"}
    run.summary["candidates_per_input"] = len(grid)
    return Built(ds, provenance(run, settings))


def summary_lines(s: dict) -> list[str]:
    if "candidates_per_input" not in s:
        return []
    return [f"  search     up to {s['candidates_per_input']} candidates per input, best by directional CLIP"]


JOB = Job(
    name="search",
    command=("search",),
    help="zero-shot best-of-N (official CycleDiffusion protocol): trials x skips x decoder scales, ranked by CLIP",
    requires=("input.uri", "output.uri", "source.model"),
    units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
    build=build,
    models=("source",),
    commits=("images", "scores", "rejects"),
    summary=summary_lines,
    check=check,
    subruns=(gallery.AFTER_RUN,),  # output.gallery: the gallery of the output after the run
)
