"""Pixel-space unets (diffusers' UNet2DModel): DDPM and LDM models, unconditional or class-conditional.

The condition of a sample is None (unconditional model) or a class index; classifier-free guidance
needs the model section's ``null_class``, the class index that stands for "no class".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.diffusion.families.components import Components
from pipeline.errors import ModelLoadError
from pipeline.model_layout import PIXEL

FAMILY = PIXEL


@dataclass
class PixelFamily:
    """How a UNet2DModel is conditioned and called: class labels, or nothing."""

    source: str
    conditioning: str  # "class" (the unet has class embeddings) or "none"
    num_class_embeds: int | None = None
    null_class: int | None = None

    def conditions(self, items: list) -> list:
        """One checked condition per sample: None for an unconditional model, else a class index."""
        if self.conditioning == "none":
            if any(c is not None for c in items):
                raise ValueError(f"model {self.source!r} is unconditional; its condition must be null")
            return items
        out = []
        last = self.num_class_embeds - 1
        for c in items:
            if c is None:
                if self.null_class is None:
                    raise ValueError(f"model {self.source!r} is class-conditional: give a class index in 0..{last}")
                c = self.null_class
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_class_embeds:
                raise ValueError(f"model {self.source!r}: condition {c!r} is not a class index in 0..{last}")
            out.append(int(c))
        return out

    def unconditional(self) -> int:
        if self.null_class is None:
            raise ValueError(
                f"model {self.source!r}: classifier-free guidance needs an unconditional class; "
                "set null_class in the model section, or guidance_scale: 1"
            )
        return self.null_class

    def forward(self, unet: torch.nn.Module, x: torch.Tensor, ts: torch.Tensor, conds: list) -> torch.Tensor:
        if self.conditioning == "class":
            labels = torch.tensor(conds, device=x.device, dtype=torch.long)
            return unet(x, ts, class_labels=labels).sample
        return unet(x, ts).sample


def load(parts: Components, unet_config: dict, null_class: int | None) -> PixelFamily:
    family = PixelFamily(parts.source, FAMILY.conditioning(unet_config), unet_config.get("num_class_embeds"),
                         null_class)
    n = family.num_class_embeds
    if n and null_class is not None and not 0 <= null_class < n:
        raise ModelLoadError(f"model {parts.source!r}: null_class {null_class} is not in 0..{n - 1}")
    return family
