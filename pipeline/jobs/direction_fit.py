"""direction fit: an h-space direction for `latentshift edit` (Asyrp, seed 001).

mean-difference: invert input.uri (set A) and hspace.examples (set B, a sub-run whose outputs go
under output.uri/examples/ and whose sums are handed to set A's run in memory) to t0, walk back
with DDIM recording h at each timestep, and write Δh_t = mean_B h_t − mean_A h_t. Per-batch sums merge on the driver (float64), so the
fit streams in bounded memory and any number of actors share it.
learned: invert the first hspace.train.images of input.uri, then train a DeltaBlock f_t in one Ray
task (a GPU when the actors get one) with the official loss and schedule.
Either way t_edit / t_boost are the config's numbers, the official 500 / 200, or "auto" from the
LPIPS curves of set A, measured whenever hspace.lpips is set (an edit's "auto" reads them from the
file); the direction file records them with the model, grid and settings.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.errors import ConfigError, StorageError
from pipeline.runtime.job import Built, Job, SubRun, image_shards, provenance, source_latents


def check(cfg) -> None:
    h = cfg.hspace
    if not h.direction:
        raise ConfigError("config error: hspace.direction is not set; it names the direction file to write")
    if h.method == "mean-difference" and not h.examples:
        raise ConfigError("config error: hspace.examples is not set; a mean-difference direction needs a second "
                          "example set (set B; input.uri is set A)")
    if h.method == "learned" and h.train.loss == "clip" and not cfg.clip.pretrained:
        raise ConfigError("config error: clip.pretrained is not set; hspace.train.loss: clip needs a local or s3:// "
                          "open_clip checkpoint (latentshift never downloads one), or use hspace.train.loss: color")
    if h.method == "learned" and h.train.loss == "clip" and not (h.source_text and h.target_text):
        raise ConfigError("config error: hspace.source_text and hspace.target_text are needed for the CLIP loss")
    if "auto" in (h.t_edit, h.t_boost) and not h.lpips:
        raise ConfigError("config error: hspace.t_edit / t_boost = auto needs hspace.lpips (an LPIPS network file, "
                          "`latentshift lpips-export PATH` writes one once), or give them as numbers")
    check_files(cfg)


def check_files(cfg) -> None:
    """Every file the fit will read, each named by its own key, before Ray starts: set B's shards (else set A
    is walked first and an empty set B blamed on input.uri), the LPIPS network, the CLIP checkpoint, and
    source.model: the kind of condition it takes, and its grid, on which a numeric t_edit must edit some step."""
    from pipeline.jobs.checks import check_condition_fits, check_t_edit_in_grid, source_folder
    from pipeline.stages.hspace import preflight_grid

    h = cfg.hspace
    folder = source_folder(cfg)
    check_condition_fits(cfg, folder)
    if h.method == "mean-difference":
        examples_shards(h.examples, cfg.input.storage_options)
    if h.lpips:
        check_lpips(h)
    if (h.method == "learned" and h.train.loss == "clip") or (h.source_text and h.target_text and cfg.clip.pretrained):
        from pipeline.jobs.checks import check_clip_checkpoint

        check_clip_checkpoint(cfg.clip, "the CLIP loss and cos(source_text, target_text) need")
    if isinstance(h.t_edit, int):  # auto comes from curves on this very grid; null is the official 500
        check_t_edit_in_grid(h.t_edit, preflight_grid(folder, h))


def examples_shards(examples, storage_options: dict):
    """Set B's shards, listed before set A is walked; none (or a listing that fails) names hspace.examples."""
    from pipeline.data.shards import list_shards

    try:
        shards = list_shards(examples, storage_options)
    except StorageError as exc:
        raise StorageError(f"hspace.examples: {exc}") from None
    if not shards:
        raise StorageError(f"hspace.examples {examples}: no .tar shards found; point hspace.examples at the shards of "
                           "set B, the images the direction leads to (pack images with `latentshift shards pack`)")
    return shards


def check_lpips(h) -> None:
    """``hspace.lpips``: there (an s3:// one fetched into the model cache the actors reuse), a safetensors file
    of LPIPS-``hspace.lpips_net`` whose tensors fit that network; no tensor read."""
    from pipeline.data.model_cache import materialize_file
    from pipeline.metrics.lpips_net import check_lpips_file

    try:
        path = materialize_file(h.lpips, h.direction_storage_options)
    except StorageError as exc:
        raise ConfigError(f"config error: hspace.lpips {exc}; write an LPIPS file once with "
                          "`latentshift lpips-export PATH`") from None
    check_lpips_file(path, h.lpips_net, shown=h.lpips)


class Sums:
    """The driver's merge of PARTIAL rows: float64 sums of h and LPIPS curves; a learned fit's latents."""

    def __init__(self, keep: int):
        self.count, self.keep, self.timesteps = 0, keep, None
        self.sums: dict[str, np.ndarray] = {}
        self.latents: list[tuple[str, np.ndarray, np.ndarray]] = []  # (id, x_start, x0), the smallest ids

    def add(self, payload: bytes) -> None:
        from pipeline.data.stats import tensors_from_bytes

        tensors, meta = tensors_from_bytes(payload)
        self.count += int(tensors["count"][0])
        self.timesteps = self.timesteps or meta["timesteps"]
        for name in ("h_sum", "h_norm_sum", "lpips_x0_sum", "lpips_xt_sum"):
            if name in tensors:
                value = tensors[name].astype(np.float64)
                self.sums[name] = self.sums[name] + value if name in self.sums else value
        if "x_start" in tensors:
            rows = zip(meta["ids"], tensors["x_start"], tensors["x0"], strict=True)
            self.latents = sorted([*self.latents, *rows], key=lambda r: r[0])[: self.keep]

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / max(self.count, 1)


def build(run, shards):
    from pipeline.runtime.ray_env import model_stage, read_images
    from pipeline.stages.hspace import DirectionFitStage

    cfg = run.cfg
    run.state["sums"] = sums = Sums(cfg.hspace.train.images)
    ds = model_stage(read_images(run, shards), cfg.runtime, DirectionFitStage, source=cfg.source, hspace=cfg.hspace,
                     output=cfg.output, clip_x0=cfg.sampler.clip_x0)
    settings = {"method": "ddim", "t0_requested": cfg.hspace.t0, "steps": cfg.hspace.steps, "grid": cfg.hspace.grid,
                "inversion_eps": cfg.hspace.inversion_eps, "source_model": cfg.source.model,
                "source_condition": cfg.source.condition, "clip_x0": cfg.sampler.clip_x0}
    return Built(ds, provenance(run, settings, source_latents(cfg, "ddim")), on_partial=sums.add)


def check_inverted(run) -> None:
    """Some image of the run's input was inverted (set A's, or set B's in its own run): else nothing to fit."""
    if run.state["sums"].count == 0:
        raise StorageError(f"{run.cfg.input.uri}: no image could be inverted ({run.summary['rejected']} rejected, "
                           f"see {run.store.path('_rejects')}); nothing to fit")


def fitted_times(run) -> tuple[int, int, dict | None]:
    """Set A checked and its t_edit / t_boost resolved, once: before set B is walked (``examples_config``)
    and before any training, so that a fit that cannot finish stops at once."""
    if "times" not in run.state:
        check_inverted(run)
        run.state["times"] = resolve_times(run.cfg, run.state["sums"])
    return run.state["times"]


def examples_config(run, cfg):
    """Set B's run, for a mean difference: hspace.examples walked on set A's grid, no latents written,
    no LPIPS curves. ``cfg`` is a copy of set A's, its output.uri already under examples/."""
    if run.cfg.hspace.method != "mean-difference":
        return None
    fitted_times(run)
    cfg.input.uri, cfg.output.latents = run.cfg.hspace.examples, "none"
    cfg.hspace.t_edit = cfg.hspace.t_boost = cfg.hspace.lpips = None  # set B needs no LPIPS curves
    return cfg


def take_examples(run, examples) -> None:
    run.state["examples"] = examples.state["sums"]


def finish(run) -> None:
    """The direction file, from set A's sums (and, for a mean difference, set B's its sub-run handed over)."""
    cfg, sums, s = run.cfg, run.state["sums"], run.summary
    h = cfg.hspace
    t_edit, t_boost, curves = fitted_times(run)
    # grid: "schedule" snaps t0 onto the scheduler's grid, "linspace" keeps it (timesteps[0] is the t0 used)
    header = {"model": cfg.source.model, "condition": cfg.source.condition, "guidance_scale": cfg.source.guidance_scale,
              "timesteps": sums.timesteps, "t0": sums.timesteps[0], "t0_requested": h.t0, "steps": h.steps,
              "grid": h.grid, "inversion_eps": h.inversion_eps,
              "t_edit": t_edit, "t_boost": t_boost, "t_edit_setting": h.t_edit, "t_boost_setting": h.t_boost,
              "lpips_edit_threshold": h.lpips_edit_threshold, "boost_curve": h.boost_curve,
              "lpips_boost_threshold": h.boost_threshold,
              "lpips_curves": curves, "image_size": cfg.image.size, "clip_x0": cfg.sampler.clip_x0,
              "input": cfg.input.uri, "count": sums.count, "created_at": time.time(), "method": h.method}
    if h.method == "mean-difference":
        tensors = mean_difference(run, sums, header)
    else:
        tensors = learned(run, sums, header)
    from pipeline.data.directions import write_direction

    write_direction(h.direction, h.direction_storage_options, tensors, header)
    s.update(direction=h.direction, method=h.method, t_edit=t_edit, t_boost=t_boost, count=sums.count,
             delta_norms=header.get("delta_norms"), losses=header.get("losses"))


def resolve_times(cfg, sums: Sums) -> tuple[int, int, dict | None]:
    """t_edit and t_boost: numbers as given, null = the official 500 / 200, auto = the first t whose mean
    LPIPS over set A reaches the threshold (official diffusion_latent.py:1308-1406, ``auto_time``). Run
    before any training, so a threshold the curves never reach stops the fit at once."""
    from pipeline.stages.hspace import FIXED_T_BOOST, FIXED_T_EDIT, auto_time

    h, curves = cfg.hspace, None
    if "lpips_x0_sum" in sums.sums:
        curves = {"timesteps": sums.timesteps, "x0_hat": sums.mean("lpips_x0_sum").tolist(),
                  "x_t": sums.mean("lpips_xt_sum").tolist(), "text_cosine": text_cosine(cfg)}
    fixed = {"t_edit": FIXED_T_EDIT, "t_boost": FIXED_T_BOOST}

    def pick(which: str) -> int:
        value = getattr(h, which)
        if value == "auto":
            return auto_time(h, curves, which)
        return fixed[which] if value is None else int(value)

    return pick("t_edit"), pick("t_boost"), curves


def text_cosine(cfg) -> float | None:
    """cos(CLIP text of source_text, of target_text), when both texts and a CLIP checkpoint are given."""
    h = cfg.hspace
    if not (h.source_text and h.target_text and cfg.clip.pretrained):
        return None
    from pipeline.stages.base import load_clip_section
    from pipeline.stages.hspace import text_cosine as cosine_of

    return cosine_of(load_clip_section(cfg.clip, "cpu"), h)


def mean_difference(run, sums: Sums, header: dict) -> dict[str, np.ndarray]:
    """Δh_t = mean over set B − mean over set A, per timestep of the grid (set B's config keeps the grid)."""
    other = run.state["examples"]
    deltas = (other.mean("h_sum") - sums.mean("h_sum")).astype(np.float32)
    norms = np.sqrt((deltas.reshape(len(deltas), -1).astype(np.float64) ** 2).sum(1))
    header.update(kind="table", examples=run.cfg.hspace.examples, count_b=other.count,
                  delta_norms=[round(float(v), 4) for v in norms],
                  h_norms_a=[round(float(v), 4) for v in sums.mean("h_norm_sum")],
                  h_norms_b=[round(float(v), 4) for v in other.mean("h_norm_sum")])
    run.summary["count_b"] = other.count
    return {"deltas": deltas}


def learned(run, sums: Sums, header: dict) -> dict[str, np.ndarray]:
    """Train a DeltaBlock in one Ray task, on the first hspace.train.images inverted latents (by shard/key)."""
    import ray

    from pipeline.runtime.ray_env import gpus_per_actor
    from pipeline.stages.hspace import TRAIN_DTYPE, train_direction

    cfg, h = run.cfg, run.cfg.hspace
    x_start = np.stack([r[1] for r in sums.latents])
    x0 = np.stack([r[2] for r in sums.latents])
    task = ray.remote(train_direction).options(num_gpus=gpus_per_actor(cfg.runtime), num_cpus=1)
    state, log, cosine = ray.get(task.remote(cfg.source, h, cfg.clip, cfg.sampler.clip_x0, cfg.runtime.dtype,
                                             x_start, x0, sums.timesteps, header["t_edit"]))
    first = state["temb_proj.weight"]
    header.update(kind="delta-block", channels=int(first.shape[0]), temb_channels=int(first.shape[1]),
                  trained_on=[r[0] for r in sums.latents][:1000], train_images=len(sums.latents),
                  train=h.train.model_dump(), train_dtype=TRAIN_DTYPE, source_text=h.source_text, target_text=h.target_text,
                  text_cosine=cosine, losses={"loss": log.loss, "attribute": log.attribute, "l1": log.l1})
    return state


def summary_lines(s: dict) -> list[str]:
    if "direction" not in s:
        return []
    line = f"  direction  {s['method']} from {s['count']} images (t_edit {s['t_edit']}, t_boost {s['t_boost']}) → {s['direction']}"
    lines = [line]
    if s.get("delta_norms"):
        lines.append(f"  |Δh|       {s['delta_norms'][0]:.3f} at t0 … {s['delta_norms'][-1]:.3f} at the last step")
    if s.get("losses"):
        loss = s["losses"]["loss"]
        lines.append(f"  training   loss {loss[0]:.4f} → {loss[-1]:.4f} over {len(loss)} iterations")
    return lines


def _job(**hooks) -> Job:
    """The walk of both sets; set A's job adds its check, set B's sub-run and the direction file."""
    return Job(
        name="direction-fit",
        command=("direction", "fit"),
        help="fit an h-space direction (mean difference of two example sets, or a learned f_t) into hspace.direction",
        requires=("input.uri", "output.uri", "source.model", "hspace.direction"),
        units=lambda cfg: image_shards(cfg.input.uri, cfg.input.storage_options),
        build=build,
        models=("source",),
        commits=("latents", "rejects", "examples"),
        summary=summary_lines,
        skip_committed=False,  # a fit covers every shard of its input, every time
        **hooks,
    )


# set B: set A's check read its shards; its sums go to set A's run in memory, so it only checks them
EXAMPLES = _job(finish=check_inverted)
JOB = _job(check=check, finish=finish, subruns=(SubRun("examples", examples_config, take_examples, job=EXAMPLES),))
