"""Per-sample noise drawn on the model's device: a sample's noise depends only on its own seed.

Noise is a pure function of (seed, stream, map index, element index), computed with the
counter-based generator Threefry-2x32-20 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the generator JAX uses) and the Box–Muller transform. So:

- the same sample yields the same noise alone, in any batch, in any order, on any actor;
- a whole batch's map is drawn in one batched set of tensor ops on the device (no per-sample
  generator, no host work, no copy), and each map is drawn when a step needs it, so a walk of
  K steps never holds K maps it has not used yet;
- across devices (CPU, CUDA) the integer stage is bit-identical; only float32 ``log``, ``cos``
  and ``sin`` round differently, so noise agrees to a few ulp (≲ 1e-6), not bit for bit.

Why by hand: torch's generators are sequential per generator (one generator per sample means
a Python loop of B kernel launches, and CPU and CUDA generators give different numbers for the
same seed); torch has no keyed, counter-based draw. Threefry needs only add, rotate and xor on
32-bit words, which int64 tensors do exactly on every device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

# recorded in every output's provenance (sampler settings): which generator drew a latent's noise
GENERATOR = "threefry2x32-20+box-muller"
_M32 = 0xFFFFFFFF
# Threefry-2x32 rotation constants and key-schedule parity (Random123 threefry.h, R_32x2_*; 0x1BD11BDA)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def sample_seed(run_seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, sample key), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{int(run_seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def default_seeds(batch_size: int, run_seed: int = 0) -> list[int]:
    """Seeds for callers that give none: keyed by position in the batch."""
    return [sample_seed(run_seed, str(i)) for i in range(batch_size)]


def threefry2x32(key: tuple[torch.Tensor, torch.Tensor], counter: tuple[torch.Tensor, torch.Tensor]):
    """Threefry-2x32 with 20 rounds on int64 tensors holding uint32 words (broadcasting).

    Returns the two output words. Checked against Random123's known-answer vectors.
    """
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = (counter[0] + ks[0]) & _M32
    x1 = (counter[1] + ks[1]) & _M32
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0.add_(x1).bitwise_and_(_M32)  # in place: a map is millions of words
            x1 = ((x1 << r).bitwise_or_(x1 >> (32 - r))).bitwise_and_(_M32).bitwise_xor_(x0)
        x0.add_(ks[(block + 1) % 3]).bitwise_and_(_M32)  # key injection after every four rounds
        x1.add_(ks[(block + 2) % 3] + block + 1).bitwise_and_(_M32)
    return x0, x1


class NoiseSource:
    """Standard normal maps for a batch of samples, one seed per sample.

    ``draw(index, shape)`` is map number ``index`` of every sample: (B, *shape) float32 on the
    device. A ``stream`` names an independent family of maps of the same seeds (e.g. "refine"),
    so a feature that needs more noise never shifts the noise an existing one draws.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", stream: str = ""):
        keys = [int(s) if not stream else sample_seed(int(s), stream) for s in seeds]
        k = torch.tensor([[x & _M32, (x >> 32) & _M32] for x in keys], dtype=torch.int64).reshape(-1, 2)
        self.key = k.to(device)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.key.shape[0]

    def draw(self, index: int, shape: Sequence[int]) -> torch.Tensor:
        b, n = len(self), math.prod(shape)
        pairs = (n + 1) // 2
        # counter = (pair index, map index): elements 2p and 2p + 1 of a map come from pair p
        p = torch.arange(pairs, dtype=torch.int64, device=self.device).expand(b, pairs)
        c1 = torch.full((b, pairs), int(index) & _M32, dtype=torch.int64, device=self.device)
        w0, w1 = threefry2x32((self.key[:, :1], self.key[:, 1:]), (p, c1))
        # Box–Muller on 24-bit uniforms: u1 in (0, 1] keeps log finite (|z| ≤ 5.8), θ in [0, 2π)
        u1 = ((w0 >> 8) + 1).to(torch.float32) * 2.0**-24
        theta = (w1 >> 8).to(torch.float32) * (2 * math.pi * 2.0**-24)
        r = torch.sqrt(-2.0 * torch.log(u1))
        z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), -1).reshape(b, 2 * pairs)
        return z[:, :n].reshape(b, *shape)


def per_sample_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    stream: str = "",
    index: int = 0,
) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape); row i comes from seeds[i] alone (one map of
    ``NoiseSource``)."""
    if not len(seeds):
        return torch.empty((0, *shape), dtype=torch.float32, device=device)
    return NoiseSource(seeds, device, stream).draw(index, shape)
