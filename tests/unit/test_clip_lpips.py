"""CLIP features, the directional CLIP loss and LPIPS, on tiny random networks, with no network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.metrics.clip import (
    IMAGENET_TEMPLATES,
    clip_score,
    clip_score_hessel,
    directional_loss,
    directional_similarity,
    load_clip,
)
from pipeline.metrics.lpips_net import load_lpips, lpips_distance, save_lpips
from pipeline.tools.random_clip import random_lpips, save_random_clip, save_random_lpips

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_network")]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config, weights = save_random_clip(tmp_path_factory.mktemp("clip"))
    return config, weights, load_clip(config, weights, device="cpu")


def _images(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def test_features_are_normalised_and_the_model_is_frozen(tiny):
    _, _, clip = tiny
    img = clip.image_features(_images(3))
    txt = clip.text_features(["a cat", "a dog"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training


def test_text_features_with_templates_are_the_renormalised_mean(tiny):
    _, _, clip = tiny
    templates = IMAGENET_TEMPLATES[:5]
    with torch.no_grad():
        tokens = clip.tokenizer([t.format("cat") for t in templates])
        each = clip.model.encode_text(tokens)
    each = each / each.norm(dim=-1, keepdim=True)
    mean = each.mean(0)
    got = clip.text_features(["cat"], templates)[0]
    assert torch.allclose(got, mean / mean.norm(), atol=1e-6)
    assert torch.allclose(clip.text_features(["cat"], templates, renormalize=False)[0], mean, atol=1e-6)
    assert torch.equal(clip.text_features(["cat"], templates)[0], got)  # cached
    assert len(IMAGENET_TEMPLATES) == 79 and all("{}" in t for t in IMAGENET_TEMPLATES)


def test_directional_similarity_against_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    src, edit = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    s_txt, t_txt = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    d_img = edit - src
    d_img = d_img / (d_img.norm(dim=1, keepdim=True) + 1e-7)
    d_txt = (t_txt - s_txt) / (t_txt - s_txt).norm()
    expected = (d_img * d_txt).sum(1) / (d_img.norm(dim=1) * d_txt.norm())
    assert torch.allclose(directional_similarity(src, edit, s_txt, t_txt), expected, atol=1e-6)
    assert torch.allclose(directional_loss(src, edit, s_txt[0], t_txt[0]), 1 - expected, atol=1e-6)
    parallel = src + torch.tensor([[0.5], [1.0], [2.0], [3.0]]) * (t_txt - s_txt)
    assert torch.allclose(directional_similarity(src, parallel, s_txt, t_txt), torch.ones(4), atol=1e-5)
    against = src - (t_txt - s_txt)
    assert torch.allclose(directional_loss(src, against, s_txt, t_txt), torch.full((4,), 2.0), atol=1e-5)


def test_clip_scores():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    txt = torch.tensor([0.6, 0.8])
    assert torch.allclose(clip_score(img, txt), torch.tensor([0.6, 0.8, -0.6]))
    assert torch.allclose(clip_score_hessel(img, txt), torch.tensor([1.5, 2.0, 0.0]))


def test_the_loss_differentiates_to_the_input_images(tiny):
    _, _, clip = tiny
    src = _images(2, seed=1)
    edit = _images(2, seed=2).requires_grad_()
    txt = clip.text_features(["a cat", "a dog"], IMAGENET_TEMPLATES[:3], renormalize=False)
    loss = directional_loss(clip.image_features(src), clip.image_features(edit), txt[0], txt[1]).mean()
    loss.backward()
    assert edit.grad is not None and torch.isfinite(edit.grad).all() and edit.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_preprocessing_resizes_the_shortest_side_and_centre_crops(tiny):
    _, _, clip = tiny
    x = _images(2, 64, 48, seed=3)
    got = clip.preprocess(x)
    assert got.shape == (2, 3, 32, 32)
    # shortest side 48 → 32: 64 × 32/48 = 42.67 → 42 rows (torchvision truncates); crop rows 5..37
    ref = F.interpolate((x + 1) / 2, size=(42, 32), mode="bicubic", antialias=True, align_corners=False)
    ref = (ref[:, :, 5:37] - clip.mean) / clip.std
    assert torch.allclose(got, ref, atol=1e-5)
    assert clip.image_features(x).shape == (2, 32)


def test_without_antialias_preprocessing_is_the_official_tensor_transform(tiny):
    """clip.antialias false = cycle-diffusion model/energy/clean_clip.py:14-17 (and the zoo's
    clip_guide.py:72-75): CLIP's Resize(n_px, BICUBIC) + CenterCrop(n_px) + Normalize on a [0, 1] tensor,
    with torchvision < 0.17's tensor default antialias=False. A 4× downscale aliases: the two differ."""
    import torchvision.transforms as T

    config, weights, antialiased = tiny
    official = load_clip(config, weights, device="cpu", antialias=False)
    x = _images(2, 128, 160, seed=5)  # [-1, 1], as our images; the official post_process maps to [0, 1]
    mean, std = official.mean.flatten().tolist(), official.std.flatten().tolist()
    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=False),
                           T.CenterCrop(32), T.Normalize(mean, std)])
    want = transform((x + 1) / 2)  # wrapper post_process: Normalize(mean=-1, std=2), unclamped
    assert torch.allclose(official.preprocess(x), want, atol=1e-5)
    assert torch.allclose(official.preprocess((x + 1) / 2, unit=True), want, atol=1e-5)  # [0, 1] input
    assert (antialiased.preprocess(x) - want).abs().mean() > 0.05  # antialiasing changes what CLIP sees
    x_big = x * 1.5  # out of [-1, 1]: nothing is clamped on the way in
    assert torch.allclose(official.preprocess(x_big), transform((x_big + 1) / 2), atol=1e-5)


def test_preprocessing_agrees_with_open_clip_on_pil(tiny):
    """Close to open_clip's own PIL transform (PIL's bicubic kernel differs slightly from torch's)."""
    import numpy as np
    import open_clip
    from PIL import Image

    _, _, clip = tiny
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    img = torch.stack([yy, xx, (yy + xx) / 2]).mul(255).round().to(torch.uint8)  # smooth gradients
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    theirs = open_clip.image_transform(32, is_train=False, mean=clip.mean.flatten().tolist(),
                                       std=clip.std.flatten().tolist())(pil)
    ours = clip.preprocess(img[None].float() / 127.5 - 1)[0]
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().mean() < 0.01 and np.isfinite(ours.numpy()).all()  # measured 0.004


def test_a_pickle_checkpoint_needs_allow_pickle(tiny, tmp_path):
    from safetensors.torch import load_file

    config, weights, clip = tiny
    pt = tmp_path / "clip.pt"
    torch.save(load_file(weights), pt)
    with pytest.raises(ConfigError, match="safetensors"):
        load_clip(config, pt, device="cpu")
    again = load_clip(config, pt, device="cpu", allow_pickle=True)
    x = _images(1)
    assert torch.allclose(again.image_features(x), clip.image_features(x), atol=1e-6)


def test_missing_weights_and_unknown_models_are_config_errors(tiny, tmp_path):
    config, weights, _ = tiny
    for missing in (None, "", tmp_path / "nope.safetensors", "openai"):  # a download tag is no file
        with pytest.raises(ConfigError, match="clip.pretrained"):
            load_clip("ViT-B-16-quickgelu", missing, device="cpu")
    for model in ("ViT-Nope-99", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-16-SigLIP",
                  "roberta-ViT-B-32", str(tmp_path / "absent.json")):
        with pytest.raises(ConfigError, match="clip.model"):
            load_clip(model, weights, device="cpu")
    with pytest.raises(ConfigError, match="clip.pretrained"):  # weights of another architecture
        other = tmp_path / "other.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(other))
        load_clip(config, other, device="cpu")


def test_a_config_file_named_like_a_builtin_does_not_shadow_it(tiny, tmp_path):
    import open_clip

    config, weights, _ = tiny
    builtin = open_clip.get_model_config("ViT-B-16")
    shadow = tmp_path / "ViT-B-16.json"
    shadow.write_text(open(config).read())
    assert load_clip(str(shadow), weights, device="cpu").image_size == (32, 32)
    assert open_clip.get_model_config("ViT-B-16") == builtin


def test_lpips_round_trip_and_distances(tmp_path):
    original = random_lpips("alex", seed=0)
    path = save_lpips(original, tmp_path / "lpips.safetensors", "alex")
    loaded = load_lpips(path, "alex", device="cpu")
    a, b = _images(2, 64, 64, seed=4), _images(2, 64, 64, seed=5)
    with torch.no_grad():
        want = original(a, b).flatten()
        got = lpips_distance(loaded, a, b)
        assert got.shape == (2,) and torch.allclose(got, want, atol=1e-6)
        assert torch.equal(lpips_distance(loaded, a, a), torch.zeros(2))
        assert (got > 0).all()
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training
    assert torch.allclose(lpips_distance(load_lpips(save_random_lpips(tmp_path / "r.safetensors"), device="cpu"),
                                         a, b).detach(), want, atol=1e-6)  # same seed, same network


def test_lpips_refuses_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="hspace.lpips"):
        load_lpips(tmp_path / "absent.safetensors")
    with pytest.raises(ConfigError, match="hspace.lpips"):
        load_lpips(None)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(ConfigError, match="hspace.lpips.*export_lpips"):
        load_lpips(foreign)
    squeeze = save_lpips(random_lpips("squeeze"), tmp_path / "sq.safetensors", "squeeze")
    with pytest.raises(ConfigError, match="LPIPS-squeeze"):
        load_lpips(squeeze, "alex")
