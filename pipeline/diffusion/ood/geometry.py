"""The geometry of a set of latents: per-point distances and angles against references, the
official selection windows (DiscoveryDiff), and gradient steps toward the measured geometry.

DiscoveryDiff discovery.py:452-604 (`unseen_sample`). That file has CR line endings; its line
numbers here are those of `git show HEAD:discovery.py | tr '\r' '\n' | cat -n`. There, one
(real OOD latent, Gaussian draw) pair gives 20 slerp points at weights k/21; each is kept when
its mean distance and mean angles to 10 random references lie in tight windows. The official
code takes no gradient step (its "optimizer" prints, discovery.py:548, name the rejection
tests); `optimise_latents` is this project's reading of the abstract's "geometric optimization".

Pure torch on flattened latents (n, d), float64 throughout. No Ray, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.diffusion.noise import sample_seed

F64 = torch.float64


# ---- geometry ------------------------------------------------------------------------------


def _angles(cos: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def point_geometry(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False,
                   max_pairs: int = 2048, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per point of x (n, d), its geometry against the reference set (m, d):

      distance      mean ‖x − r_j‖ over references
      angle_origin  mean angle at the origin between x and r_j (degrees)
      angle_point   mean angle at x between r_j − x and r_k − x over reference pairs (degrees)

    ``exclude_self`` when x is the reference set itself (drop j = i and pairs holding i).
    """
    x, ref = x.reshape(x.shape[0], -1).to(F64), ref.reshape(ref.shape[0], -1).to(F64)
    dist = torch.cdist(x, ref)  # (n, m)
    cos0 = (x @ ref.T) / (x.norm(dim=1, keepdim=True) * ref.norm(dim=1)[None])
    ang0 = _angles(cos0)
    m = ref.shape[0]
    mask = torch.ones_like(dist, dtype=torch.bool)
    if exclude_self:
        mask.fill_diagonal_(False)
    counts = mask.sum(1).clamp(min=1)
    out = {"distance": (dist * mask).sum(1) / counts, "angle_origin": (ang0 * mask).sum(1) / counts}

    # angle at x between r_j − x and r_k − x: cos = ((r_j−x)·(r_k−x)) / (|r_j−x||r_k−x|),
    # over a fixed random subset of pairs (j < k) so the cost stays bounded for large m
    g = torch.Generator().manual_seed(seed)
    j = torch.randint(0, m, (max_pairs,), generator=g)
    k = torch.randint(0, m, (max_pairs,), generator=g)
    keep = j != k
    j, k = j[keep], k[keep]
    gram_rr = ref @ ref.T
    xr = x @ ref.T  # (n, m)
    xx = (x * x).sum(1, keepdim=True)  # (n, 1)
    dot = gram_rr[j, k][None] - xr[:, j] - xr[:, k] + xx  # (r_j−x)·(r_k−x)
    cos = dot / (dist[:, j] * dist[:, k]).clamp(min=1e-300)
    ang = _angles(cos)
    pair_mask = torch.ones_like(ang, dtype=torch.bool)
    if exclude_self:
        idx = torch.arange(x.shape[0])[:, None]
        pair_mask = (j[None] != idx) & (k[None] != idx)
    out["angle_point"] = (ang * pair_mask).sum(1) / pair_mask.sum(1).clamp(min=1)
    out["norm"] = x.norm(dim=1)
    return out


GEOMETRY_KEYS = ("norm", "distance", "angle_origin", "angle_point")


def pairwise_distributions(x: torch.Tensor, max_triplets: int = 4096, seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw values for histograms: norms, every pairwise distance and angle at the origin (i < j),
    and the angle at a point between two others over random triplets (degrees)."""
    x = x.reshape(x.shape[0], -1).to(F64)
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    norms = x.norm(dim=1)
    dist = torch.cdist(x, x)
    cos0 = (x @ x.T) / (norms[:, None] * norms[None])
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(0, n, (max_triplets,), generator=g) for _ in range(3))
    keep = (a != b) & (a != c) & (b != c)
    a, b, c = a[keep], b[keep], c[keep]
    u, v = x[b] - x[a], x[c] - x[a]
    cos_p = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))
    return {"norm": norms, "distance": dist[i, j], "angle_origin": _angles(cos0[i, j]), "angle_point": _angles(cos_p)}


def measure_geometry(ref: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The reservoir's geometry: mean and spread (std over points) of each per-point statistic."""
    per_point = point_geometry(ref, ref, exclude_self=True, seed=seed)
    out = {}
    for name in GEOMETRY_KEYS:
        v = per_point[name]
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_std"] = float(v.std()) if v.numel() > 1 else 0.0
    return out


def separability(mean_a: torch.Tensor, mean_b: torch.Tensor) -> dict[str, float]:
    """Distance between two Gaussians' means against the separability scale d^¼."""
    d = mean_a.numel()
    dist = float((mean_a.to(F64) - mean_b.to(F64)).norm())
    return {"mean_distance": dist, "d": d, "d_quarter": d**0.25, "ratio": dist / d**0.25 if d else math.nan}


# ---- the official selection windows --------------------------------------------------------------


@dataclass(frozen=True)
class GeometryWindow:
    """The official selection: a latent's mean statistics over ``references`` random references
    must lie this close to the data's (DiscoveryDiff discovery.py:540-575). The official targets
    are constants measured on its data (611.4, 88.0°, 60°); ours are ``measure_geometry``'s means,
    so the distance window is kept relative (0.3 / 611.4 ≈ 0.05 %)."""

    references: int = 10  # [random.randint(0, 999) for _ in range(10)], discovery.py:540
    distance: float = 0.3 / 611.4  # relative; abs(mean_dis - 611.4) <= 0.3, discovery.py:547
    angle_origin: float = 0.1  # degrees; abs(origin_angle - 88.0) <= 0.1, discovery.py:559
    angle_point: float = 0.1  # degrees; abs(pair_angle - 60) <= 0.1, discovery.py:570


def reference_pairs(seed: int, m: int, count: int, exclude: int = -1,
                    stream: str = "select") -> tuple[torch.Tensor, torch.Tensor]:
    """The references one latent is measured against: ``count`` indices i into the m references,
    drawn with replacement from the latent's own seed (random.randint, discovery.py:540), and the
    partner i + 1 of each for the angle at the latent (the official pair, discovery.py:566),
    wrapping at m (where the official code would index past its array). ``exclude`` (a slerp
    candidate's own source latent) is never drawn nor partnered. ``stream`` keeps the
    optimisation's references independent of the selection's."""
    if m < 3:
        raise ValueError(f"the window selection needs at least 3 reference latents, got {m}")
    g = torch.Generator().manual_seed(sample_seed(seed, f"ood-references/{stream}"))
    if exclude < 0:
        idx = torch.randint(0, m, (count,), generator=g)
    else:  # uniform over the m − 1 others: draw from m − 1 and step over the excluded index
        idx = torch.randint(0, m - 1, (count,), generator=g)
        idx = idx + (idx >= exclude).long()
    partner = (idx + 1) % m
    return idx, torch.where(partner == exclude, (idx + 2) % m, partner)


def _angle_between(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle between rows, degrees. Exact π: find_angle divides by 3.14159 (discovery.py:84), a
    bias of 7·10⁻⁵° at 88°, far inside the 0.1° window."""
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def window_statistics(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor,
                      partner: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each latent's official statistics against its own references (idx, partner: (n, R)):

      distance      mean_i ‖x − r_i‖                  discovery.py:543-546
      angle_origin  mean_i ∠(x, r_i) at the origin    find_angle(origin, x, r_i), discovery.py:553-557
      angle_point   mean_i ∠(r_i − x, r_i' − x) at x  find_angle(x, r_i, r_i+1), discovery.py:565-569

    One row at a time, vectorised over its references: memory stays R·d, a row's numbers never
    depend on the batch around it, and it is differentiable, for ``optimise_latents``.
    """
    x = x.reshape(x.shape[0], -1).to(F64)
    ref = reference.reshape(reference.shape[0], -1)
    rows = []
    for j in range(x.shape[0]):
        r, r_next = ref[idx[j]].to(F64), ref[partner[j]].to(F64)  # (R, d) each
        u, v = r - x[j], r_next - x[j]
        rows.append(torch.stack([u.norm(dim=1).mean(), _angle_between(x[j], r).mean(), _angle_between(u, v).mean()]))
    s = torch.stack(rows) if rows else x.new_zeros((0, 3))
    return {"distance": s[:, 0], "angle_origin": s[:, 1], "angle_point": s[:, 2]}


def within_window(stats: dict[str, torch.Tensor], geometry: dict[str, float], window: GeometryWindow) -> torch.Tensor:
    """Rows whose three statistics all lie in the window around the measured means (discovery.py:575)."""
    target = geometry["distance_mean"]
    ok = (stats["distance"] - target).abs() <= window.distance * target
    ok &= (stats["angle_origin"] - geometry["angle_origin_mean"]).abs() <= window.angle_origin
    ok &= (stats["angle_point"] - geometry["angle_point_mean"]).abs() <= window.angle_point
    return ok


def calibrate_window(reference: torch.Tensor, geometry: dict[str, float], coverage: float = 0.9,
                     references: int = 10, seed: int = 0) -> GeometryWindow:
    """Windows that let ``coverage`` of the reference latents themselves pass on each statistic
    (jointly at least 1 − 3·(1 − coverage)), each measured against ``references`` of the others.
    The official windows fit the official data (d = 3·256·256); at small d a 10-reference mean
    fluctuates more than 0.05 % and they reject real latents too. In-sample: check the result
    on held-out latents with ``acceptance_rate``."""
    m = reference.shape[0]
    pairs = [reference_pairs(sample_seed(seed, f"ood-calibrate/{i}"), m, references, exclude=i) for i in range(m)]
    idx, partner = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    s = window_statistics(reference, reference, idx, partner)

    def spread(values: torch.Tensor) -> float:
        return float(torch.quantile(values.abs(), coverage))

    return GeometryWindow(references, spread(s["distance"] / geometry["distance_mean"] - 1),
                          spread(s["angle_origin"] - geometry["angle_origin_mean"]),
                          spread(s["angle_point"] - geometry["angle_point_mean"]))


def geometric_loss(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor, partner: torch.Tensor,
                   geometry: dict[str, float]) -> torch.Tensor:
    """Per row, the misfit of its statistics to the measured geometry in scale-free units:
    ((D − D*)/D*)² + Δθ_origin² + Δθ_point² (angles in radians)."""
    s = window_statistics(x, reference, idx, partner)
    distance = s["distance"] / geometry["distance_mean"] - 1
    origin = torch.deg2rad(s["angle_origin"] - geometry["angle_origin_mean"])
    point = torch.deg2rad(s["angle_point"] - geometry["angle_point_mean"])
    return distance**2 + origin**2 + point**2


def optimise_latents(x: torch.Tensor, reference: torch.Tensor, idx: torch.Tensor, partner: torch.Tensor,
                     geometry: dict[str, float], steps: int = 10, lr: float = 0.25) -> torch.Tensor:
    """``steps`` plain gradient steps on ``geometric_loss``: each latent moves toward the measured
    mean distance and angles (the abstract's "geometric optimization"; the official code only
    filters). Steps are taken on y = x / D*, where the terms' gradients are of order one whatever
    the latent size: gradient descent is stable for lr < 1/|∇|², and |∇θ_origin| = D*/‖x‖ ≲ √2
    there (‖x‖² ≥ D*²/2 when x is as far from the data as the data is from itself), so lr < 0.5;
    the default 0.25 keeps a factor 2. Deterministic, rows independent."""
    scale = float(geometry["distance_mean"])
    y = x.reshape(x.shape[0], -1).to(F64) / scale
    for _ in range(steps):
        y = y.detach().requires_grad_(True)
        loss = geometric_loss(y * scale, reference, idx, partner, geometry).sum()
        (grad,) = torch.autograd.grad(loss, y)
        y = y - lr * grad
    return (y * scale).detach()
