"""Guidance energies E(x | c) over images x in [-1, 1]: one value per sample, (B,), differentiable in x.

Plug-and-play guidance (CycleDiffusion, Wu & De la Torre, arXiv 2210.05559, the guidance section; seed
002 lines 83-99) samples p(x | c) ∝ p(x)·exp(−λ E(x | c)) through the latent z of a generator G. An
energy here is a callable ``E(images, keys=None) -> (B,)``; ``keys`` are per-sample integers that seed
its random augmentations (``pipeline.metrics.augment``), ignored by the energies that have none.

  clip   E_CLIP(x | t) = 1/L Σ_l (1 − cos(CLIP_img(DiffAug_l(x)), CLIP_text(t)))      (seed 002 line 97;
         ChenWu98/unified-generative-zoo model/energy/clip_guide.py:38-62: DiffAug on (x + 1)/2 in [0, 1])
  color  ‖mean RGB(x) − target‖²                       (offline; mean colour in [0, 1] per channel)
  hue    1 − cos(angle between the mean chroma vector and the target hue direction)   (offline)

The two offline energies need no network, so the guide job runs and is tested without a download.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pipeline.metrics.augment import augment, param_count

# |chroma| floor of the hue energy: below it (a grey image) the direction is undefined, and E → 1 smoothly
HUE_EPS = 1e-4


class ClipEnergy:
    """E_CLIP: 1 − cos(CLIP image features, CLIP text features), averaged over ``count`` DiffAugment
    augmentations of each image (``policy``; none when count is 0 or the policy is empty).

    The paper averages over L augmentations to "mitigate the adversarial effect" (seed 002 line 99) of
    optimising pixels against one CLIP view. The official code (model/energy/clip_guide.py) takes
    L = 50 replicas per image (:18) and the policy 'color,translation,resize,cutout' (:10), and augments
    the generator's output as its wrapper hands it over: post-processed to [0, 1] by (x + 1)/2, not
    clamped (latentdiff_wrapper.py:200-202, 271-272). So the views are made on (x + 1)/2 here, where
    brightness moves by ±½ of the range and the fills are black, and reach CLIP as [0, 1] images
    (``unit=True``: CLIP's own resize, crop and normalisation, clip_guide.py:72-75). Whether x is
    clamped first is the caller's (``guide.clamp``).
    """

    def __init__(self, clip, text: str, policy: Sequence[str] = (), count: int = 0):
        param_count(policy)  # an unknown op fails here, not mid-run
        self.clip, self.text = clip, text
        self.policy, self.count = tuple(policy), int(count) if policy else 0
        self.text_feat = clip.text_features([text])  # (1, D), normalised, cached by Clip; never differentiated

    def __call__(self, images: torch.Tensor, keys: Sequence[int] | None = None) -> torch.Tensor:
        if not self.count:
            return 1 - self.similarity(images)
        if keys is None:
            raise ValueError("the clip energy augments its input: give one augmentation key per image")
        from pipeline.metrics.clip import clip_score

        b = images.shape[0]
        unit = (images + 1) / 2  # post_process: Normalize(mean −1, std 2), [-1, 1] → [0, 1] (latentdiff_wrapper.py:200-202)
        views = augment(unit, self.policy, keys, self.count)  # (B·L, 3, H, W), sample-major (clip_guide.py:45-51)
        cos = clip_score(self.clip.image_features(views, unit=True), self.text_feat)
        return (1 - cos).view(b, self.count).mean(1)  # 1/L Σ_l (1 − cos_l) (clip_guide.py:55)

    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """cos(CLIP_img(x), CLIP_text(t)) per image, no augmentation: the CLIP score of an output."""
        from pipeline.metrics.clip import clip_score

        return clip_score(self.clip.image_features(images), self.text_feat)


def clip_energy(clip, text: str, policy: Sequence[str] = (), count: int = 0) -> ClipEnergy:
    """E_CLIP of ``text`` with ``clip`` (a ``pipeline.metrics.clip.Clip``), ``count`` augmentations of ``policy``."""
    return ClipEnergy(clip, text, policy, count)


def mean_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 3) mean colour in [0, 1] of images (B, 3, H, W) in [-1, 1]."""
    return (images.float().mean(dim=(2, 3)) + 1) / 2


def color_energy(target_rgb: Sequence[float]) -> Callable:
    """E = ‖mean RGB(x) − target‖², target in [0, 1]³ (the h-space ``color`` loss, stages/hspace.py
    attribute_loss, per sample): 0 when the image's mean colour is the target, at most 3."""
    target = torch.tensor([float(c) for c in target_rgb], dtype=torch.float32)
    if target.shape != (3,):
        raise ValueError(f"target colour needs three values (R, G, B in [0, 1]), got {list(target_rgb)}")

    def energy(images: torch.Tensor, keys: Sequence[int] | None = None) -> torch.Tensor:
        return (mean_rgb(images) - target.to(images.device)).pow(2).sum(1)

    return energy


def chroma(rgb: torch.Tensor) -> torch.Tensor:
    """(…, 3) RGB → (…, 2) chroma (α, β) of the hexagonal opponent plane:
    α = R − (G + B)/2, β = (√3/2)(G − B). atan2(β, α) is the hue angle: 0° red, 60° yellow, 120° green,
    180° cyan, 240° blue, 300° magenta (the HSV/HSL hue on the hexagon's vertices; Hanbury 2008,
    "Constructing cylindrical coordinate colour spaces", the usual "hue from RGB" formula)."""
    r, g, b = rgb.unbind(-1)
    return torch.stack((r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)), -1)


def hue_energy(target_hue_degrees: float) -> Callable:
    """E = 1 − cos(θ − h): θ the angle of the image's mean chroma vector, h the target hue. In [0, 2]:
    0 when the mean colour has hue h, 1 for grey or a hue 90° away, 2 for the opposite hue.

    Why the mean chroma vector (= the chroma of the mean colour, the map being linear) and not a mean of
    per-pixel hues: a pixel's hue is undefined for greys and jumps at 0°/360°; the mean vector weights
    each pixel by its saturation, so a grey background does not vote, and it is smooth everywhere
    except at zero chroma, which ``HUE_EPS`` softens. The energy is scale-free: it moves the hue, not
    the saturation (use ``color`` for that).
    """
    h = math.radians(float(target_hue_degrees))
    direction = torch.tensor([math.cos(h), math.sin(h)], dtype=torch.float32)

    def energy(images: torch.Tensor, keys: Sequence[int] | None = None) -> torch.Tensor:
        v = chroma(mean_rgb(images))  # (B, 2)
        norm = torch.sqrt(v.pow(2).sum(-1) + HUE_EPS**2)
        return 1 - (v * direction.to(v.device)).sum(-1) / norm

    return energy


def make_energy(guide, clip_loader: Callable[[], object] | None = None) -> Callable:
    """The energy the ``guide`` config section names. ``clip_loader()`` returns the ``clip`` section's
    model; called only for ``energy: clip``, so the offline energies never load a network.

    Augmentations apply to the CLIP energy only: they guard against adversarial gradients of a
    network (seed 002 line 99); the colour and hue energies are plain statistics that brightness and
    saturation jitter would only bias.
    """
    if guide.energy == "clip":
        if not guide.text:
            raise ValueError("guide.text is not set: the clip energy needs the prompt c")
        if clip_loader is None:
            raise ValueError("the clip energy needs a CLIP model (clip_loader)")
        return clip_energy(clip_loader(), guide.text, guide.augment, guide.augmentations)
    if guide.energy == "color":
        return color_energy(guide.target_color)
    if guide.energy == "hue":
        return hue_energy(guide.target_hue)
    raise ValueError(f"unknown guide.energy {guide.energy!r}; one of clip, color, hue")
