"""Gaussian statistics of out-of-domain latents, their geometry, and geometric sampling
("Unseen Image Synthesis with Diffusion Models", seed 003).

OOD images DDIM-inverted to an intermediate t0 through a frozen single-domain model form a
Gaussian N(μ, σ²I) there, distinguishable from the in-domain one. We fit μ and σ² in one
streaming pass that merges across batches and actors, keep a bounded uniform reservoir of
latents, measure the geometry of that reservoir, and sample new latents from the Gaussian,
keeping those whose geometry against the reservoir matches what the data shows.

Two samplers. ``sample_latents`` (this project's first reading): Gaussian candidates kept within
``tolerance`` × the data's spread of its mean geometry. ``sample_candidates`` adds the official
one (DiscoveryDiff, github.com/L-YeZhu/DiscoveryDiff, ``unseen_sample`` in discovery.py): a
candidate is the slerp of a real inverted OOD latent with a Gaussian draw at a weight k/21, kept
when its mean distance and angles to 10 random references sit in tight windows; optionally a few
gradient steps toward the measured geometry first. Every candidate is a pure function of
(stats, run seed, index, settings), so any machine regenerates it from its index.

``fit`` (grid, moments, reservoir), ``geometry`` (distances, angles, windows) and ``candidates``
(draws, slerp, selection). Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from pipeline.diffusion.ood.candidates import (
    SLERP_POINTS,
    CandidateResult,
    CandidateSettings,
    OODStats,
    SampleResult,
    acceptance_rate,
    candidate_latent,
    candidate_latents,
    candidate_seed,
    choose_slerp_weight,
    draw_candidates,
    sample_candidates,
    sample_latents,
    selection_mask,
    slerp,
    slerp_acceptance,
    slerp_source,
    slerp_weights,
    within_tolerance,
)
from pipeline.diffusion.ood.fit import (
    MomentFit,
    Reservoir,
    fit_moments,
    ood_grid,
    priority,
)
from pipeline.diffusion.ood.geometry import (
    GEOMETRY_KEYS,
    GeometryWindow,
    calibrate_window,
    geometric_loss,
    measure_geometry,
    optimise_latents,
    pairwise_distributions,
    point_geometry,
    reference_pairs,
    separability,
    window_statistics,
    within_window,
)

__all__ = [
    "CandidateResult",
    "CandidateSettings",
    "GEOMETRY_KEYS",
    "GeometryWindow",
    "MomentFit",
    "OODStats",
    "Reservoir",
    "SLERP_POINTS",
    "SampleResult",
    "acceptance_rate",
    "calibrate_window",
    "candidate_latent",
    "candidate_latents",
    "candidate_seed",
    "choose_slerp_weight",
    "draw_candidates",
    "fit_moments",
    "geometric_loss",
    "measure_geometry",
    "ood_grid",
    "optimise_latents",
    "pairwise_distributions",
    "point_geometry",
    "priority",
    "reference_pairs",
    "sample_candidates",
    "sample_latents",
    "selection_mask",
    "separability",
    "slerp",
    "slerp_acceptance",
    "slerp_source",
    "slerp_weights",
    "window_statistics",
    "within_tolerance",
    "within_window",
]
