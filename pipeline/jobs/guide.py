"""guide: guidance in latent space (CycleDiffusion, arXiv 2210.05559; seed 002 lines 81-99). For each of
``guide.count`` images, Langevin dynamics on the latent z of ``source.model``,
z ← z − (s/2)∇_z(½‖z‖² + λ·E(G(z) | c)) + √s·n, then G(z) → shards ``guided-NNNNN`` of
``guide.shard_size`` (the ledger's exactly-once rules hold). ``sampler.method: dpm`` (η > 0): z = (x_T, ε…)
and G the stochastic walk; ``method: ddim, eta: 0``: z = x_T and G the deterministic DDIM walk, the
official LDM runs (ChenWu98/unified-generative-zoo model/gan_wrapper/latentdiff_wrapper.py:24, 212).
Rows are built on the driver (image numbers only); actors regenerate every chain from (sampler.seed, key)."""

from __future__ import annotations

import math

from pipeline.data.shards import ShardRef
from pipeline.errors import ConfigError
from pipeline.jobs import gallery
from pipeline.runtime.job import Built, Job, provenance, source_latents

PREFIX = "guided"


def check(cfg) -> None:
    """What the energy and the decoder need, named by key, before any model loads."""
    g = cfg.guide
    if g.energy == "clip":
        from pipeline.jobs.checks import check_clip_checkpoint

        if not g.text:
            raise ConfigError("config error: guide.text is not set; guide.energy clip needs the prompt c")
        check_clip_checkpoint(cfg.clip, "guide.energy clip (or use color | hue, offline) needs")
    s = cfg.sampler
    if s.method == "ddim" and s.eta != 0:
        raise ConfigError(f"config error: sampler.eta = {s.eta} with sampler.method ddim: guide's ddim G is the "
                          "deterministic walk of z = x_T (set sampler.eta: 0), method dpm the stochastic one (eta > 0)")
    if s.method == "dpm" and g.chain_steps not in (None, s.steps):
        raise ConfigError(f"config error: guide.chain_steps = {g.chain_steps} with sampler.method dpm: z holds one "
                          f"noise map per step of the {s.steps}-step grid, so the chain cannot walk another; "
                          "use sampler.method ddim, eta 0 (z = x_T), or leave guide.chain_steps null")
    from pipeline.jobs.checks import check_condition_fits, source_folder, warn

    # any model may be guided (an unconditional one too, as the official FFHQ runs): its condition must fit it
    check_condition_fits(cfg, source_folder(cfg))
    if g.langevin_steps == 0 and g.weight:
        # warned, not refused: 0 steps is the unguided baseline G(z⁽⁰⁾) with the same seeds (the guide demo runs
        # it), but then λ and the energy are never used, which a run that meant to guide should hear of
        warn(f"guide.langevin_steps is 0, so guide.weight (λ = {g.weight:g}) and guide.energy {g.energy} are not "
             "applied: the outputs are the unguided decodes G(z⁽⁰⁾); set guide.langevin_steps > 0 to guide")


def units(cfg) -> list[ShardRef]:
    """Output shards named by position: guided-00000, guided-00001, …"""
    return [ShardRef(str(cfg.output.uri), f"{PREFIX}-{j:05d}") for j in range(math.ceil(cfg.guide.count / cfg.guide.shard_size))]


def settings(cfg) -> dict:
    """What every output records of the run: energy and its target, λ, s, steps, augmentations, G."""
    from pipeline.diffusion.guidance import INIT_STREAM, LANGEVIN_STREAM
    from pipeline.diffusion.noise import GENERATOR

    g, s = cfg.guide, cfg.sampler
    target = {"clip": {"text": g.text, "clip_model": cfg.clip.model, "clip_pretrained": cfg.clip.pretrained,
                       "clip_antialias": cfg.clip.antialias},
              "color": {"target_color": list(g.target_color)}, "hue": {"target_hue": g.target_hue}}[g.energy]
    augmented = g.energy == "clip" and g.augmentations > 0 and bool(g.augment)
    return {"method": "langevin", "source_model": cfg.source.model, "source_condition": cfg.source.condition,
            "source_guidance": cfg.source.guidance_scale, "energy": g.energy, **target, "weight": g.weight,
            "step_size": g.step_size, "langevin_steps": g.langevin_steps, "clamp": g.clamp,
            "augmentations": g.augmentations if augmented else 0, "augment": list(g.augment) if augmented else [],
            "checkpoint": g.checkpoint, "seed": s.seed, "decoder": s.method, "steps": s.steps,
            "chain_steps": g.chain_steps or s.steps, "eta": s.eta if s.method == "dpm" else 0.0, "strength": 1.0,
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
    return Built(ds, provenance(run, settings(cfg), source_latents(cfg)))  # dpm (η) or ddim (η 0) latents


SUMMARY_KEYS = ("energy", "text", "target_color", "target_hue", "weight", "step_size", "langevin_steps", "augmentations",
                "decoder", "steps", "chain_steps")


def summary_lines(s: dict) -> list[str]:
    if "guide" not in s:
        return []
    g = s["guide"]
    target = {"clip": f"text {g.get('text')!r}", "color": f"target colour {g.get('target_color')}",
              "hue": f"target hue {g.get('target_hue')}°"}[g["energy"]]
    chain = f"{g['chain_steps']} in the chain, " if g["chain_steps"] != g["steps"] else ""
    grid = f"{g['decoder']} G on {chain}{g['steps']} steps"
    return [f"  guidance   energy {g['energy']} ({target}), λ {g['weight']}, s {g['step_size']}, "
            f"{g['langevin_steps']} Langevin steps, {g['augmentations']} augmentations; {grid}"]


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
    subruns=(gallery.AFTER_RUN,),  # output.gallery: the gallery of the output after the run
)
