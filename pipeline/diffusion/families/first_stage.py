"""The first stage of a latent model: the autoencoder between images and the space the diffusion runs in.

Any family can have one (Stable Diffusion's AutoencoderKL in vae/, an LDM's VQModel in vqvae/ or vae/), so
it is not a family of its own: ``load_denoiser`` adds it wherever the folder has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.diffusion.families.components import Components
from pipeline.model_layout import FIRST_STAGES, first_stage_class


@dataclass
class FirstStage:
    """z = (E(x) − shift) · scaling_factor and back; no no_grad here, the ``Denoiser`` decides."""

    model: torch.nn.Module
    dtype: torch.dtype
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [-1,1], float32 → z, float32.

        The VAE posterior mean (deterministic), scaled as in training. A VQ first stage gives its latent
        before quantisation, as LDM's ``encode_first_stage`` does (its decoder quantises, ``VQModel.decode``).
        """
        encoded = self.model.encode(x.to(self.dtype))
        mean = (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents).float()
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """z → images (B,3,H,W), float32, unclamped."""
        z = x0 / self.scaling_factor + self.shift_factor
        return self.model.decode(z.to(self.dtype)).sample.float()

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, h, w) of z for images of shape (3, H, W)."""
        factor = 2 ** (len(self.model.config.block_out_channels) - 1)
        return (self.model.config.latent_channels, image_shape[1] // factor, image_shape[2] // factor)


def load(parts: Components) -> FirstStage | None:
    """The folder's first stage, frozen; None for a pixel-space model."""
    import diffusers

    folder = next((k for k in FIRST_STAGES if k in parts), None)
    if folder is None:
        return None
    cls_name = first_stage_class(parts.config(folder), folder, parts.source)
    model = parts.load(getattr(diffusers, cls_name), folder)
    if cls_name == "VQModel":  # LDM's VQ models run at scale_factor 1: diffusers' LDMPipeline decodes
        return FirstStage(model, parts.dtype)  # latents unscaled, whatever the config holds
    return FirstStage(model, parts.dtype, scaling_factor=float(model.config.get("scaling_factor", 0.18215) or 1.0),
                      shift_factor=float(model.config.get("shift_factor", 0.0) or 0.0))


def build(name: str, config: dict) -> torch.nn.Module | None:
    """The network of ``vae/`` or ``vqvae/`` from its config, without weights (None: a class diffusers
    does not have, which loading refuses)."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", FIRST_STAGES[name]), None)
    return None if cls is None else cls.from_config(config)
