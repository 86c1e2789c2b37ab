"""The attribute losses a learned h-space direction trains on: directional CLIP as the official code, and colour."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ClipConfig, HSpaceConfig
from pipeline.diffusion import load_denoiser
from pipeline.metrics.clip import IMAGENET_TEMPLATES, load_clip
from pipeline.stages.hspace import attribute_loss
from pipeline.tools.random_clip import save_random_clip

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def den(pixel_model):
    return load_denoiser(str(pixel_model))


def test_clip_loss_is_minus_log_of_one_plus_directional_similarity_over_two(den, tmp_path):
    cfg_json, weights = save_random_clip(tmp_path)
    hspace = HSpaceConfig(source_text="a blue square", target_text="a red square", method="learned")
    loss, l1_factor, cosine = attribute_loss(den, hspace, ClipConfig(model=cfg_json, pretrained=weights))
    clip = load_clip(cfg_json, weights)
    plain = clip.text_features(["a blue square"]), clip.text_features(["a red square"])
    assert cosine == pytest.approx(float((plain[0] * plain[1]).sum()), abs=1e-6) and l1_factor == cosine

    g = torch.Generator().manual_seed(0)
    x0, x_edit = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1)
    x_edit.requires_grad_(True)
    value = loss(x_edit, x0)
    # by hand (losses/clip_loss.py:110-115, 170-180; diffusion_latent.py:343): template means of normalised
    # text features, their difference normalised; image features' difference normalised; −log((2 − (1 − cos))/2)
    t_src = clip.text_features(["a blue square"], IMAGENET_TEMPLATES, renormalize=False)
    t_trg = clip.text_features(["a red square"], IMAGENET_TEMPLATES, renormalize=False)
    text_dir = (t_trg - t_src) / (t_trg - t_src).norm(dim=-1, keepdim=True)
    img = clip.image_features(x_edit.detach()) - clip.image_features(x0)
    img_dir = img / (img.norm(dim=-1, keepdim=True) + 1e-7)
    cos = torch.nn.functional.cosine_similarity(img_dir, text_dir.expand_as(img_dir))
    assert value.item() == pytest.approx(float(-torch.log((1 + cos) / 2).mean()), abs=1e-5)
    value.backward()
    assert x_edit.grad is not None and x_edit.grad.abs().sum() > 0


def test_color_loss_is_the_squared_distance_of_the_mean_colour(den):
    hspace = HSpaceConfig(method="learned", train={"loss": "color", "target_color": [1.0, 0.0, 0.0]})
    loss, l1_factor, cosine = attribute_loss(den, hspace, ClipConfig())
    assert l1_factor == 1.0 and cosine is None
    x = torch.zeros(2, 3, 4, 4)  # mid grey: (0.5, 0.5, 0.5) in [0, 1]
    assert float(loss(x, x)) == pytest.approx(0.25 + 0.25 + 0.25)
