"""Part 5 of the demo: guidance in latent space (CycleDiffusion) with the offline hue energy, unguided
and guided on the same seeds, measured (hue error, disc rate) and its table lines."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.demo.common import TARGETS, fmt, label_counts, met_word, read_images

GUIDE_WITHIN_DEG = 30.0  # a guided image reaches the target when its hue is this close (shape metric)


def guide_runs(base: str, cfg_dir: Path, overrides: list[str], count: int, out) -> dict:
    """Part 5's jobs: `guide` twice with configs/demo/guide.yaml on image numbers 0 … count − 1, so on the
    same seeds and the same z⁽⁰⁾: unguided (guide.langevin_steps 0: G(z⁽⁰⁾), the plain decode of the
    initial latent; DIR/guide/unguided) and guided (DIR/guide/guided). Whatever differs between the
    two rows, column by column, is the Langevin walk's doing."""
    from pipeline.config import load_config
    from pipeline.demo.common import run_quietly

    started = time.time()
    runs = {}
    # unguided: no Langevin step, and λ 0 to say so (λ alone would be warned about as never applied)
    for name, extra in (("unguided", ["guide.langevin_steps=0", "guide.weight=0"]), ("guided", [])):
        cfg = load_config(cfg_dir / "guide.yaml", [f"output.uri={base}/guide/{name}", f"guide.count={count}",
                                                   *overrides, *extra])
        runs[name] = {"cfg": cfg, "summary": run_quietly(cfg, "guide", overwrite=True, out=out)}
    return {**runs, "seconds": round(time.time() - started, 1)}


def guide_metrics(unguided: np.ndarray, guided: np.ndarray, target_hue: float,
                  within_deg: float = GUIDE_WITHIN_DEG) -> dict:
    """The guide row's figures, by the shape metric, for two stacks of images on the same seeds (row i
    of each from one z⁽⁰⁾): per stack the median and mean hue error to ``target_hue`` over its lit
    images, the share of all its images within ``within_deg`` of it (an unlit image is not), the disc
    rate (the shape kept) and the mean side of the lit ones; over the seeds lit in both, the mean drop
    of the hue error and the share of seeds that guidance brought closer."""
    from pipeline.metrics.shapes import hue_error, measure_shapes

    def one(images):
        m = measure_shapes(images)
        lit = m["label"] != "none"
        err = hue_error(m["hue"], target_hue)
        return lit, err, {
            "count": len(images),
            "median_hue_error_deg": float(np.median(err[lit])) if lit.any() else None,
            "mean_hue_error_deg": float(err[lit].mean()) if lit.any() else None,
            "within_rate": float((lit & (err <= within_deg)).mean()) if len(images) else None,
            "disc_rate": float((m["label"] == "discs").mean()) if len(images) else None,
            "mean_side_px": float(m["side"][lit].mean()) if lit.any() else None,
            "labels": label_counts(m["label"]),
        }

    lit_u, err_u, u = one(unguided)
    lit_g, err_g, g = one(guided)
    both = lit_u & lit_g
    return {"target_hue_deg": float(target_hue), "within_deg": float(within_deg), "unguided": u, "guided": g,
            "pairs": int(both.sum()),
            "mean_hue_error_drop_deg": float((err_u - err_g)[both].mean()) if both.any() else None,
            "closer_rate": float((err_g < err_u)[both].mean()) if both.any() else None}


def measure_guide(jobs: dict, local: Path) -> tuple[dict, list]:
    """Part 5's row of the report (``guide_metrics`` plus the settings and the targets) and its two
    contact-sheet rows, unguided above guided, the same seed in each column."""
    cfg = jobs["guided"]["cfg"]
    g = cfg.guide
    read = {name: read_images(local / "guide" / name / "images") for name in ("unguided", "guided")}
    keys = sorted(set(read["unguided"]) & set(read["guided"]))
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    stacks = {name: np.stack([images[k] for k in keys]) if keys else empty for name, images in read.items()}
    m = guide_metrics(stacks["unguided"], stacks["guided"], g.target_hue)
    targets = {"within_rate": TARGETS["guide_within_rate"], "disc_rate": TARGETS["guide_disc_rate"]}
    met = {k: m["guided"][k] is not None and m["guided"][k] >= v for k, v in targets.items()}
    row = {**m, "energy": g.energy, "weight": g.weight, "step_size": g.step_size, "langevin_steps": g.langevin_steps,
           "steps": cfg.sampler.steps, "eta": cfg.sampler.eta, "clip_x0": cfg.sampler.clip_x0,
           "model": cfg.source.model, "seed": cfg.sampler.seed, "targets": targets, "target_met": met,
           "images": {name: jobs[name]["summary"].get("images") for name in ("unguided", "guided")},
           "folders": {"unguided": "guide/unguided", "guided": "guide/guided"}, "seconds": jobs.get("seconds")}
    u, gd = m["unguided"], m["guided"]

    def title(m):  # ASCII only: the contact sheet's default font may lack λ and °
        return f"hue error median {fmt(m['median_hue_error_deg'], unit=' deg')}, {fmt(m['disc_rate'], pct=True)} discs"

    sheet = [(f"guidance: unguided, G(z0)\n{title(u)}", list(stacks["unguided"][:16])),
             (f"guided toward hue {g.target_hue:g} deg, same seeds\n(weight {g.weight:g}, {g.langevin_steps} Langevin "
              f"steps)\n{title(gd)}",
              list(stacks["guided"][:16]))]
    return row, sheet


def guide_lines(g: dict) -> list[str]:
    u, gd, within = g["unguided"], g["guided"], f"within {g['within_deg']:g}°"
    targets, met = g["targets"], g["target_met"]
    lines = [
        f"  guidance in latent space (CycleDiffusion) through the discs model: {g['energy']} energy toward "
        f"{g['target_hue_deg']:g}°" + (f" ({g['seconds']} s)" if g.get("seconds") is not None else ""),
        f"    λ {g['weight']:g}, s {g['step_size']:g}, {g['langevin_steps']} Langevin steps, {g['steps']}-step decoder "
        f"grid, η {g['eta']:g}, x̂0 clip {g['clip_x0']}; {u['count']} seeds, each unguided (G(z0)) and guided",
        f"      {'':<12}{'hue error median':>17}{'mean':>9}{within:>13}{'discs':>8}{'side':>10}",
    ]
    for name, m in (("unguided", u), ("guided", gd)):
        lines.append(f"      {name:<12}{fmt(m['median_hue_error_deg'], unit='°'):>17}{fmt(m['mean_hue_error_deg'], unit='°'):>9}"
                     f"{fmt(m['within_rate'], pct=True):>13}{fmt(m['disc_rate'], pct=True):>8}"
                     f"{fmt(m['mean_side_px'], unit=' px'):>10}")
    closer = "n/a" if g["closer_rate"] is None else f"{g['closer_rate']:.0%}"
    lines += [
        f"      guided closer to the target than unguided on {closer} of {g['pairs']} seeds, mean hue error "
        f"down {fmt(g['mean_hue_error_drop_deg'], unit='°')}",
        f"      guided {within} {fmt(gd['within_rate'], pct=True)} (target ≥ {targets['within_rate']:.0%}) "
        f"{met_word(met['within_rate'])}; discs {fmt(gd['disc_rate'], pct=True)} (target ≥ {targets['disc_rate']:.0%}) "
        f"{met_word(met['disc_rate'])}",
    ]
    return lines
