"""The ID-vs-OOD report of ``ood fit --reference``: compare the OOD fit of a run with the fit of
the in-domain shards (made the same way, by the sub-run ``ood_fit.reference_config`` declares,
handed over in memory): JSON + PNG under report/."""

from __future__ import annotations

import io

import torch


def write_report(run, reference) -> dict:
    """``run``: the OOD fit; ``reference``: the finished run that fitted the in-domain shards."""
    from pipeline.diffusion.ood import (
        measure_geometry,
        pairwise_distributions,
        point_geometry,
        separability,
    )

    cfg, store, state, id_state = run.cfg, run.store, run.state, reference.state
    # the ID variance as its stats file holds it (ood.variance's kind), averaged in numpy as when read from it
    id_variance = id_state["moments"].variance(reference.cfg.ood.variance).numpy().mean()
    fits = {"ood": {"count": state["moments"].count, "mean": state["moments"].mean,
                    "variance": float(state["moments"].variance("isotropic")), "latents": state["reservoir"].latents},
            "id": {"count": id_state["moments"].count, "mean": id_state["moments"].mean,
                   "variance": float(id_variance), "latents": id_state["reservoir"].latents}}
    sep = separability(fits["ood"]["mean"], fits["id"]["mean"])
    stats, raw = {}, {}
    for name, f in fits.items():
        raw[name] = {k: v.tolist() for k, v in pairwise_distributions(f["latents"]).items()}
        stats[name] = {"count": f["count"], "geometry": measure_geometry(f["latents"]), "variance": f["variance"]}
    cross = point_geometry(fits["ood"]["latents"], fits["id"]["latents"])
    report = {"separability": sep, "ood": stats["ood"], "id": stats["id"],
              "ood_to_id_distance_mean": float(cross["distance"].mean()),
              "selection": selection_rates(fits["ood"]["latents"], fits["id"]["latents"], cfg.ood),
              "distinguishable": sep["mean_distance"] > sep["d_quarter"],
              "input": cfg.input.uri, "reference": run.options["reference"], "model": cfg.source.model,
              "t0": state["timesteps"][0]}
    json_path, png_path = store.path("report", "ood_vs_id.json"), store.path("report", "ood_vs_id.png")
    store.put_json(json_path, report)
    store.put(png_path, _figure(raw, sep))
    report["json"], report["png"] = json_path, png_path
    return report


def selection_rates(ood: torch.Tensor, id_latents: torch.Tensor, ood_cfg) -> dict:
    """Does the geometric selection discriminate? The share of real OOD latents (the reservoir,
    each left out of its own references where the selection draws references) and of ID latents
    that each selection keeps, measured against the OOD reservoir as ``ood sample`` does."""
    from pipeline.diffusion.ood import (
        CandidateSettings,
        GeometryWindow,
        OODStats,
        acceptance_rate,
        calibrate_window,
        measure_geometry,
    )

    ood = ood.reshape(ood.shape[0], -1).double()
    stats = OODStats(ood.mean(0), torch.ones(1), ood, measure_geometry(ood))
    selections = {
        f"tolerance_{ood_cfg.tolerance:g}": CandidateSettings(selection="tolerance", tolerance=ood_cfg.tolerance),
        "window_official": CandidateSettings(selection="window", window=GeometryWindow()),
        f"window_calibrated_{ood_cfg.window_coverage:g}": CandidateSettings(
            selection="window", window=calibrate_window(ood, stats.geometry, coverage=ood_cfg.window_coverage)),
    }
    everyone = list(range(ood.shape[0]))
    return {name: {"ood": round(acceptance_rate(ood, stats, s, exclude=everyone), 4),
                   "id": round(acceptance_rate(id_latents.reshape(id_latents.shape[0], -1).double(), stats, s), 4)}
            for name, s in selections.items()}


def _figure(raw: dict, sep: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"norm": "norm ‖x‖", "distance": "pairwise distance", "angle_origin": "pairwise angle at origin (°)",
              "angle_point": "angle at a point between two others (°)"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for name, colour in (("id", "tab:blue"), ("ood", "tab:orange")):
            ax.hist(raw[name][key], bins=40, alpha=0.6, color=colour, label=name.upper())
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"ID vs OOD latents at t0: ‖μ_OOD − μ_ID‖ = {sep['mean_distance']:.2f}, d^¼ = {sep['d_quarter']:.2f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
