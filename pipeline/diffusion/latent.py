"""The latent of a diffusion encoder: where it starts and the noise of every step after."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass
class Latent:
    """z = (x_{t0}, ε_{τ_k}, …, ε_{τ_1}) for a batch (docs/maths.md, "DPM-Encoder").

    x_start:   (B, C, h, w)     state at timesteps[0], in the model's space (VAE latents for
                                latent models, pixels for pixel models)
    noise:     (B, K, C, h, w)  the innovation used when leaving timesteps[i]; K = 0 for a
                                deterministic (DDIM) latent. For a step whose σ_t > 0 it is ε_t,
                                a standard normal variate; for a step with σ_t = 0 (only the
                                last step can have one) it is the additive residual that makes
                                the step land exactly on x0 (see dpm.py).
    timesteps: K ints (or any count for DDIM), strictly descending
    method:    "dpm" | "ddim"
    eta:       η of the stochastic encoder (0 for DDIM)
    seeds:     per-sample seeds the noise came from (used again by refine steps)
    source:    the model that encoded it, and
    condition: its condition: decoding with both is a reconstruction (the only decode that
               replays a σ_t = 0 residual; dpm.dpm_decode_model_space). None: not known.
    """

    x_start: torch.Tensor
    noise: torch.Tensor
    timesteps: list[int]
    method: str = "dpm"
    eta: float = 0.0
    seeds: list[int] = field(default_factory=list)
    source: str | None = None
    condition: object = None

    def __post_init__(self) -> None:
        self.timesteps = [int(t) for t in self.timesteps]
        if self.x_start.dim() != 4:
            raise ValueError(f"x_start must be (B, C, h, w), got shape {tuple(self.x_start.shape)}")
        b = self.x_start.shape[0]
        if self.noise.dim() != 5 or self.noise.shape[0] != b or self.noise.shape[2:] != self.x_start.shape[1:]:
            raise ValueError(
                f"noise must be (B, K, C, h, w) matching x_start {tuple(self.x_start.shape)}, "
                f"got {tuple(self.noise.shape)}"
            )
        if self.method == "dpm" and self.noise.shape[1] not in (0, len(self.timesteps)):
            raise ValueError(
                f"a dpm latent needs one noise per timestep: {self.noise.shape[1]} noises, "
                f"{len(self.timesteps)} timesteps"
            )

    @property
    def start_only(self) -> bool:
        """A dpm latent stored without its noises (``output.latents: start``): not decodable."""
        return self.method == "dpm" and self.noise.shape[1] == 0

    def __len__(self) -> int:
        return int(self.x_start.shape[0])

    def without_noise(self) -> Latent:
        """The start-only latent of the same samples (what ``output.latents: start`` stores)."""
        return replace(self, noise=self.noise[:, :0])

    def to(self, *args, **kwargs) -> Latent:
        """Like ``Tensor.to``: a device, a dtype, or both."""
        return replace(self, x_start=self.x_start.to(*args, **kwargs), noise=self.noise.to(*args, **kwargs))

    def __getitem__(self, index) -> Latent:
        """Select samples (int, slice, list or tensor of indices)."""
        if isinstance(index, int):
            index = [index]
        seeds = list(np.asarray(self.seeds, dtype=np.int64)[index]) if self.seeds else []
        condition = self.condition
        if isinstance(condition, (list, tuple)):  # one condition per sample
            condition = [condition[int(i)] for i in np.arange(len(self))[index]]
        return replace(self, x_start=self.x_start[index], noise=self.noise[index], seeds=[int(s) for s in seeds],
                       condition=condition)

    @staticmethod
    def cat(latents: list[Latent]) -> Latent:
        first = latents[0]
        for z in latents[1:]:
            if z.timesteps != first.timesteps or z.method != first.method or z.eta != first.eta:
                raise ValueError("only latents with the same timesteps, method and eta can be joined")
        per_sample = [z.condition if isinstance(z.condition, (list, tuple)) else [z.condition] * len(z) for z in latents]
        conditions = [c for cs in per_sample for c in cs]
        return replace(
            first,
            x_start=torch.cat([z.x_start for z in latents]),
            noise=torch.cat([z.noise for z in latents]),
            seeds=[s for z in latents for s in z.seeds],
            source=first.source if all(z.source == first.source for z in latents) else None,
            condition=conditions[0] if all(c == conditions[0] for c in conditions) else conditions,
        )

    # --- compact serialisation: one flat vector per sample, plus its shape -------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample's stacked latent: (1 + K, C, h, w)."""
        return (1 + self.noise.shape[1], *self.x_start.shape[1:])

    def to_rows(self, dtype=np.float16, start_only: bool = False) -> tuple[np.ndarray, tuple[int, ...]]:
        """(B, N) array, each row x_start then every noise flattened; and the per-sample shape.

        float16 by default (docs/guarantees.md, "Latents on disk"): a latent row of 1+K maps at 64×64×4 is a few hundred KB.
        ``start_only`` keeps x_start alone (``output.latents: start``).
        """
        stacked = self.x_start.unsqueeze(1) if start_only else torch.cat([self.x_start.unsqueeze(1), self.noise], 1)
        # cast on the model's device: half the bytes cross to the host for float16 rows
        arr = stacked.detach().to(torch.from_numpy(np.zeros(0, dtype)).dtype).cpu().numpy()
        return arr.reshape(arr.shape[0], -1), tuple(arr.shape[1:])

    @classmethod
    def from_rows(
        cls,
        rows: np.ndarray,
        shape: tuple[int, ...],
        timesteps: list[int],
        method: str = "dpm",
        eta: float = 0.0,
        seeds: list[int] | None = None,
    ) -> Latent:
        """Inverse of ``to_rows`` (returns float32 tensors on CPU)."""
        arr = torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(-1, *shape))
        return cls(
            x_start=arr[:, 0].contiguous(),
            noise=arr[:, 1:].contiguous(),
            timesteps=list(timesteps),
            method=method,
            eta=eta,
            seeds=list(seeds or []),
        )
