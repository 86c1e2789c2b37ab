"""Per-sample noise: a sample's noise depends only on its own seed, never on its batch.

Each sample gets a CPU ``torch.Generator`` seeded by ``sample_seed(run_seed, key)`` and
draws all the noise it will need in one call, so the same sample yields the same latent
alone, in any batch, in any order, and on any device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def sample_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, sample key), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{int(run_seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def default_seeds(batch_size: int, run_seed: int = 0) -> list[int]:
    """Seeds for callers that give none: keyed by position in the batch."""
    return [sample_seed(run_seed, str(i)) for i in range(batch_size)]


def per_sample_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    stream: str = "",
) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape); row i comes from seeds[i] alone.

    ``stream`` names an independent stream of the same seed (e.g. "refine"), so adding a
    feature that needs more noise never shifts the noise an existing one draws.
    """
    rows = []
    for seed in seeds:
        s = seed if not stream else sample_seed(seed, stream)
        g = torch.Generator(device="cpu").manual_seed(int(s))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    if not rows:
        return torch.empty((0, *shape), dtype=torch.float32, device=device)
    return torch.stack(rows).to(device)
