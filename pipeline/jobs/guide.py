"""guide: guidance in latent space (CycleDiffusion, arXiv 2210.05559; seed 002 lines 81-99). For each of
``guide.count`` images, Langevin dynamics on the DPM latent z of ``source.model``,
z ← z − (s/2)∇_z(½‖z‖² + λ·E(G(z) | c)) + √s·n, then G(z) → shards ``guided-NNNNN`` of
``guide.shard_size`` (the ledger's exactly-once rules hold). Rows are built on the driver (image numbers
only); actors regenerate every chain from (sampler.seed, key)."""

from __future__ import annotations

import math

from pipeline.data.shards import ShardRef
from pipeline.errors import ConfigError
from pipeline.runtime.job import Built, Job, provenance, source_latents

PREFIX = "guided"


def check(cfg) -> None:
    """What the energy and the stochastic decoder need, named by key, before any model loads."""
    g = cfg.guide
    if g.energy == "clip":
        from pipeline.stages.score import check_clip_checkpoint

        check_clip_checkpoint(cfg.clip, "guide.energy clip (or use color | hue, offline) needs")
        if not g.text:
            raise ConfigError("config error: guide.text is not set; guide.energy clip needs the prompt c")
    if not cfg.sampler.eta > 0:
        raise ConfigError(f"config error: sampler.eta = {cfg.sampler.eta}: guide walks the stochastic DPM decoder "
                          "G(z) and needs eta > 0 (with eta 0 the noise maps of z would drive nothing)")


def units(cfg) -> list[ShardRef]:
    """Output shards named by position: guided-00000, guided-00001, …"""
    return [ShardRef(str(cfg.output.uri), f"{PREFIX}-{j:05d}") for j in range(math.ceil(cfg.guide.count / cfg.guide.shard_size))]


def settings(cfg) -> dict:
    """What every output records of the run: energy and its target, λ, s, steps, augmentations, G."""
    from pipeline.diffusion.guidance import INIT_STREAM, LANGEVIN_STREAM
    from pipeline.diffusion.noise import GENERATOR

    g, s = cfg.guide, cfg.sampler
    target = {"clip": {"text": g.text, "clip_model": cfg.clip.model, "clip_pretrained": cfg.clip.pretrained},
              "color": {"target_color": list(g.target_color)}, "hue": {"target_hue": g.target_hue}}[g.energy]
    augmented = g.energy == "clip" and g.augmentations > 0 and bool(g.augment)
    return {"method": "langevin", "source_model": cfg.source.model, "source_condition": cfg.source.condition,
            "source_guidance": cfg.source.guidance_scale, "energy": g.energy, **target, "weight": g.weight,
            "step_size": g.step_size, "langevin_steps": g.langevin_steps,
            "augmentations": g.augmentations if augmented else 0, "augment": list(g.augment) if augmented else [],
            "checkpoint": g.checkpoint, "seed": s.seed, "steps": s.steps, "eta": s.eta, "strength": 1.0,
            "clip_x0": s.clip_x0, "noise": GENERATOR, "noise_streams": [INIT_STREAM, LANGEVIN_STREAM]}


def build(run, shards):
    import ray.data

    from pipeline.data.rows import CANDIDATE_COLUMNS, RowBuffer, RowKind
    from pipeline.runtime.ray_env import model_stage
    from pipeline.stages.guide import GuideStage

    cfg, size = run.cfg, run.cfg.guide.shard_size
    rows = RowBuffer(CANDIDATE_COLUMNS)
    for shard in shards:
        j = int(shard.name.rsplit("-", 1)[1])
        chunk = range(j * size, min(cfg.guide.count, (j + 1) * size))
        run.ledger.expect(shard.name, len(chunk))
        for i, c in enumerate(chunk):
            rows.add(shard=shard.name, key=f"{c:09d}", index=i, kind=RowKind.SAMPLE, candidate=c)
    batch = rows.batch()
    ds = ray.data.from_items([{c: batch[c][i] for c in rows.columns} for i in range(len(rows))],
                             override_num_blocks=max(1, len(shards)))
    ds = model_stage(ds, cfg.runtime, GuideStage, source=cfg.source, guide=cfg.guide, clip=cfg.clip,
                     sampler=cfg.sampler, output=cfg.output, size=cfg.image.size)
    run.summary["guide"] = {k: v for k, v in settings(cfg).items() if k in SUMMARY_KEYS}
    return Built(ds, provenance(run, settings(cfg), source_latents(cfg, "dpm")))


SUMMARY_KEYS = ("energy", "text", "target_color", "target_hue", "weight", "step_size", "langevin_steps", "augmentations")


def summary_lines(s: dict) -> list[str]:
    if "guide" not in s:
        return []
    g = s["guide"]
    target = {"clip": f"text {g.get('text')!r}", "color": f"target colour {g.get('target_color')}",
              "hue": f"target hue {g.get('target_hue')}°"}[g["energy"]]
    return [f"  guidance   energy {g['energy']} ({target}), λ {g['weight']}, s {g['step_size']}, "
            f"{g['langevin_steps']} Langevin steps, {g['augmentations']} augmentations"]


JOB = Job(
    name="guide",
    command=("guide",),
    help="guidance in latent space (CycleDiffusion): Langevin on DPM latents of source.model toward guide.energy",
    requires=("output.uri", "source.model"),
    units=units,
    build=build,
    models=("source",),
    commits=("images", "latents", "scores"),  # scores/: the CLIP score of each output, with energy clip
    summary=summary_lines,
    check=check,
    claim_up_front=True,  # build() stages every shard's rows on the driver: no reader to claim them
)
