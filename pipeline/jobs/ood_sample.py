"""ood sample: make candidates from the fitted Gaussian (``ood.candidates``: Gaussian draws, or
the official slerp of real inverted latents toward them; optionally optimised toward the
measured geometry), keep the geometric matches (on the driver: cheap), decode the kept latents
from t0 on the actor pool → ``ood.count`` images in shards ``unseen-NNNNN`` of
``ood.shard_size`` (the ledger's exactly-once rules hold). Actors regenerate each latent from
(stats, run seed, index, settings): nothing but indices is shipped."""

from __future__ import annotations

import math

from pipeline.data.shards import ShardRef
from pipeline.errors import ConfigError
from pipeline.jobs import gallery
from pipeline.jobs.ood_fit import stats_uri
from pipeline.runtime.job import Built, Job, provenance, source_latents


def check(cfg) -> None:
    """The stats file exists and was fitted with this model, t0 and step count."""
    from pipeline.data.stats import read_stats

    source = stats_uri(cfg)
    _, header = read_stats(source, cfg.output.storage_options)
    problems = []
    if header.get("model") != cfg.source.model:
        problems.append(f"it was fitted with model {header.get('model')!r}, not source.model {cfg.source.model!r}")
    if header.get("t0_requested") != cfg.ood.t0:
        problems.append(f"it was fitted at t0 = {header.get('t0_requested')}, not ood.t0 = {cfg.ood.t0}")
    if header.get("inversion_steps") != cfg.ood.inversion_steps:
        problems.append(f"it was fitted with {header.get('inversion_steps')} inversion steps, not {cfg.ood.inversion_steps}")
    if header.get("clip_x0", "auto") != cfg.sampler.clip_x0:  # decoding must treat x̂0 as the inversion did
        problems.append(f"it was fitted with sampler.clip_x0 = {header.get('clip_x0', 'auto')}, not {cfg.sampler.clip_x0}")
    if problems:
        raise ConfigError(f"config error: ood.stats {source}: {'; '.join(problems)}; fit it again with `latentshift ood fit`")


def units(cfg) -> list[ShardRef]:
    """Output shards named by position: unseen-00000, unseen-00001, …"""
    return [ShardRef(stats_uri(cfg), f"unseen-{j:05d}") for j in range(math.ceil(cfg.ood.count / cfg.ood.shard_size))]


def build(run, shards):
    import dataclasses

    import ray.data

    from pipeline.data.rows import CANDIDATE_COLUMNS, RowBuffer, RowKind
    from pipeline.data.stats import read_stats
    from pipeline.diffusion.ood import acceptance_rate, sample_candidates
    from pipeline.runtime.ray_env import model_stage
    from pipeline.stages.ood import SampleDecodeStage, candidate_settings, ood_stats

    cfg, size, source = run.cfg, run.cfg.ood.shard_size, stats_uri(run.cfg)
    tensors, header = read_stats(source, cfg.output.storage_options)
    stats = ood_stats(tensors, header)
    try:
        result = sample_candidates(stats, cfg.ood.count, run_seed=cfg.sampler.seed,
                                   settings=candidate_settings(cfg.ood, stats), target_rate=cfg.ood.slerp_target_rate)
    except ValueError as exc:  # a selection that keeps too few, or no slerp weight that passes: name the keys
        raise ConfigError(f"config error: ood sample: {exc}") from None
    chosen = dataclasses.asdict(result.settings)  # the slerp weight resolved: what regenerates every latent
    acceptance = round(result.acceptance_rate, 4)
    run.summary.update(candidates_drawn=result.drawn, kept=len(result.indices), acceptance_rate=acceptance,
                       candidates=chosen)
    if result.settings.selection != "none":  # how the selection treats real OOD latents (each left out of its own references)
        m = stats.reference.shape[0]
        run.summary["reservoir_acceptance_rate"] = round(acceptance_rate(
            stats.reference, stats, result.settings, seed=cfg.sampler.seed, exclude=list(range(m))), 4)
    position = {s.name: int(s.name.rsplit("-", 1)[1]) for s in shards}
    rows = RowBuffer(CANDIDATE_COLUMNS)
    for name, j in position.items():
        chunk = result.indices[j * size : (j + 1) * size]
        run.ledger.expect(name, len(chunk))
        for i, c in enumerate(chunk):
            rows.add(shard=name, key=f"{c:09d}", index=i, kind=RowKind.SAMPLE, candidate=c)
    batch = rows.batch()
    ds = ray.data.from_items([{c: batch[c][i] for c in rows.columns} for i in range(len(rows))],
                             override_num_blocks=max(1, len(shards)))
    ds = model_stage(ds, cfg.runtime, SampleDecodeStage, source=cfg.source, output=cfg.output,
                     run_seed=cfg.sampler.seed, stats_uri=source, stats_options=cfg.output.storage_options,
                     candidates=chosen, clip_x0=cfg.sampler.clip_x0)
    settings = {"seed": cfg.sampler.seed, "source_model": cfg.source.model, "stats": source, "t0": header["t0"],
                "candidates": chosen, "acceptance_rate": acceptance, "clip_x0": cfg.sampler.clip_x0}
    return Built(ds, provenance(run, settings, source_latents(cfg, "ddim")))


def summary_lines(s: dict) -> list[str]:
    if "acceptance_rate" not in s:
        return []
    c = s["candidates"]
    made = c["mode"] + (f" (weight {c['weight']:.3f})" if c["mode"] == "slerp" else "")
    made += f", {c['optimise_steps']} optimisation steps" if c["optimise_steps"] else ""
    lines = [f"  candidates {made}",
             f"  selection  {c['selection']}: kept {s['kept']} of {s['candidates_drawn']} candidates "
             f"(acceptance {s['acceptance_rate']:.2%})"]
    if "reservoir_acceptance_rate" in s:
        lines.append(f"             real OOD latents (the reservoir, each left out) pass at {s['reservoir_acceptance_rate']:.2%}")
    return lines


JOB = Job(
    name="ood-sample",
    command=("ood", "sample"),
    help="sample ood.count latents from ood.stats and decode them to shards",
    requires=("output.uri", "source.model"),
    units=units,
    build=build,
    models=("source",),
    commits=("images", "latents"),
    summary=summary_lines,
    check=check,
    claim_up_front=True,  # build() stages every shard's rows on the driver: no reader to claim them
    subruns=(gallery.AFTER_RUN,),  # output.gallery: the gallery of the output after the run
)
