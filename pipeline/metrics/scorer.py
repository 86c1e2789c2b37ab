"""CLIP scores of image batches on the device: the ``Scorer`` that `latentshift score`, translate's
``score.inline`` and the zero-shot search share, and the texts it scores against.

  CLIP score   cos(E(output), T(target text))
  directional  cos(normalise(E(output) − E(input)), normalise(T(target text) − T(source text)))

E: L2-normalised CLIP image features; T: L2-normalised features of the plain text (the official
CycleDiffusion ranking, ChenWu98/cycle-diffusion model/energy/clean_clip.py:19-41: ``clip_score``
line 38, ``dclip_score`` line 39), or with ``score.templates`` the mean over the ImageNet templates
(Asyrp's compute_text_direction, kwonminki/Asyrp_official losses/clip_loss.py:110-117).

A stage loads one per actor with ``pipeline.stages.base.load_scorer`` (the CLIP checkpoint comes
through the model cache, which this layer does not reach).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.config import ModelConfig, ScoreConfig
from pipeline.errors import ConfigError
from pipeline.metrics.clip import IMAGENET_TEMPLATES, Clip, clip_score, directional_similarity


def _prompt(condition) -> str | None:
    """A model section's condition when it is a prompt (a class index is no text)."""
    return (condition.strip() or None) if isinstance(condition, str) else None


def score_texts(score: ScoreConfig, source: ModelConfig, target: ModelConfig,
                directional: bool = True) -> tuple[str | None, str]:
    """(source text, target text): ``score.*_text``, else the model section's prompt condition.

    The target text is always needed (the CLIP score is against it); the source text only for the
    directional score. Missing ones are errors naming the key to set.
    """
    target_text = (score.target_text or "").strip() or _prompt(target.condition)
    if not target_text:
        raise ConfigError("config error: score.target_text is not set and target.condition is not a prompt; "
                          "CLIP scores need the text the outputs should match (e.g. score.target_text: 'a dog')")
    if not directional:
        return None, target_text
    source_text = (score.source_text or "").strip() or _prompt(source.condition)
    if not source_text:
        raise ConfigError("config error: score.source_text is not set and source.condition is not a prompt; "
                          "directional CLIP needs the text of the input images (e.g. score.source_text: 'a cat')")
    return source_text, target_text


class Scorer:
    """A frozen CLIP and the two texts' features, computed once (per actor); scores batches on its device."""

    def __init__(self, clip: Clip, source_text: str | None, target_text: str, templates: bool = False):
        self.clip = clip
        self.source_text, self.target_text = source_text, target_text
        tmpl = IMAGENET_TEMPLATES if templates else None
        # with templates, the mean of normalised per-template features, not renormalised, as Asyrp's
        # text direction (clip_loss.py:110-117); the CLIP score is a cosine, so its norm does not matter
        self.target = clip.text_features([target_text], tmpl, renormalize=False)
        self.source = clip.text_features([source_text], tmpl, renormalize=False) if source_text else None

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def _images(self, x) -> torch.Tensor:
        """uint8 (B, H, W, 3) (numpy or tensor) or float (B, 3, H, W) in [-1, 1] → [-1, 1] on the device."""
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:  # the bytes travel, a quarter of float32's; converted on the device
            # the stages' to_model_range (pipeline/stages/tensors.py), which this layer cannot import
            return x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def score(self, outputs, inputs=None) -> tuple[np.ndarray, np.ndarray]:
        """(clip_score, directional), float32 (B,) each on the host; directional NaN without ``inputs``
        or without a source text. One CLIP forward for outputs and inputs together."""
        out = self._images(outputs)
        n = out.shape[0]
        pair = inputs is not None and self.source is not None
        both = torch.cat([out, self._images(inputs)]) if pair else out
        feats = self.clip.image_features(both)
        scores = clip_score(feats[:n], self.target)  # clean_clip.py:38
        if pair:  # clean_clip.py:33-36, 39 (image and text directions normalised)
            directional = directional_similarity(feats[n:], feats[:n], self.source, self.target)
        else:
            directional = torch.full_like(scores, math.nan)
        host = torch.stack([scores, directional]).float().cpu().numpy()  # one copy back
        return host[0].astype(np.float32), host[1].astype(np.float32)
