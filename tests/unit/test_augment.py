"""DiffAugment (pipeline/metrics/augment.py) against the code the official guidance runs:
ChenWu98/unified-generative-zoo model/lib/diffaug/DiffAugment_pytorch.py, cited as :LINE. Each official
op is written out here as it is there, with its random draw (torch.randint, np.random.rand) replaced
by the value our uniforms map to, so the comparison is of the arithmetic, sizes and rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.metrics.augment import augment, cutout, diff_augment, draw_params, resize, translation

pytestmark = pytest.mark.unit


def official_resize(x: torch.Tensor, resize_ratio: float) -> torch.Tensor:
    """:55-77 with np.random's ratio given."""
    resized_img = F.interpolate(x, size=int(resize_ratio * x.shape[3]), mode="bilinear")
    if int(resize_ratio * x.shape[3]) < x.shape[3]:
        left_pad = int((x.shape[3] - int(resize_ratio * x.shape[3])) / 2.0)
        right_pad = x.shape[3] - left_pad - resized_img.shape[3]
        return F.pad(resized_img, (left_pad, right_pad, left_pad, right_pad), "constant", 0.0)
    left = int((int(resize_ratio * x.shape[3]) - x.shape[3]) / 2.0)
    return resized_img[:, :, left:(left + x.shape[3]), left:(left + x.shape[3])]


def official_translation(x: torch.Tensor, translation_x: torch.Tensor, translation_y: torch.Tensor) -> torch.Tensor:
    """:44-52 with torch.randint's shifts given, (N,) each."""
    n = x.size(0)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(n), torch.arange(x.size(2)), torch.arange(x.size(3)),
                                                indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x.view(n, 1, 1) + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y.view(n, 1, 1) + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2).contiguous()


def official_cutout(x: torch.Tensor, offset_x: torch.Tensor, offset_y: torch.Tensor, ratio: float = 0.5):
    """:80-94 with torch.randint's offsets given, (N,) each."""
    n = x.size(0)
    cutout_size = int(x.size(2) * ratio + 0.5), int(x.size(3) * ratio + 0.5)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(n), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x.view(n, 1, 1) - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y.view(n, 1, 1) - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(n, x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def _images(n, size, dtype=torch.float64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ratios below and above 1 on sizes where int() and the /2 rounding matter: 17·0.85 = 14.45 → 14 and
# a pad of 1 left, 2 right; 15·1.1 = 16.5 → 16 and a crop from 0; 17·1.19 = 20.23 → 20, crop from 1;
# 16·0.8 → 12 (the smallest); 33·0.97 = 32.01 → 32 (pad 0 left, 1 right); 256·1.0 → identity
@pytest.mark.parametrize(("size", "ratio"), [(17, 0.85), (15, 1.1), (17, 1.19), (16, 0.8), (33, 0.97), (256, 1.0),
                                             (256, 0.9123), (224, 1.137), (15, 0.93), (16, 1.0625)])
def test_resize_is_the_official_interpolate_and_pad_or_crop(size, ratio):
    u = torch.tensor([(ratio - 0.8) / 0.4], dtype=torch.float32)
    official_ratio = float(u) * (1.2 - 0.8) + 0.8  # np.random.rand()*(max_ratio-min_ratio) + min_ratio (:56)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x = _images(2, size, dtype)
        got = resize(x, u.expand(2).view(2, 1))
        assert torch.allclose(got, official_resize(x, official_ratio), atol=atol, rtol=0)
    s = int(official_ratio * size)
    if s < size:  # the padding is black (0): a border of zeros of the official widths
        left = int((size - s) / 2)
        assert torch.count_nonzero(got[:, :, :left]) == 0 and torch.count_nonzero(got[:, :, left + s:]) == 0
        assert torch.count_nonzero(got[:, :, left:left + s, left:left + s] == 0) == 0


def test_resize_gives_each_image_its_own_ratio_in_one_batched_call_and_is_differentiable():
    ratios = torch.tensor([[0.05], [0.5], [0.97]], dtype=torch.float32)
    x = _images(3, 17).requires_grad_(True)
    got = resize(x, ratios)
    for i in range(3):
        assert torch.allclose(got[i:i + 1], official_resize(x[i:i + 1].detach(), float(ratios[i]) * 0.4 + 0.8),
                              atol=1e-12)
    got.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [12, 13, 16, 20])
def test_translation_shifts_are_the_officials_int_h_eighth_plus_half(size):
    """S = int(H·0.125 + 0.5) (:41): 12 → 2 (H // 8 would be 1), 13 → 2, 16 → 2, 20 → 3. Every shift in
    {−S … S} is reached, each by its share of [0, 1) (torch.randint(−S, S + 1), :42-43)."""
    shift = int(size * 0.125 + 0.5)
    k = torch.arange(2 * shift + 1)
    u = (k.double() + 0.5) / (2 * shift + 1)  # the middle of shift −S + k's share
    x = _images(len(k), size)
    got = translation(x, torch.stack([u, u.flip(0)], 1).float())
    assert torch.equal(got, official_translation(x, k - shift, (k - shift).flip(0)))


@pytest.mark.parametrize("size", [15, 16, 17])
def test_cutout_box_is_the_officials_int_h_half_plus_half(size):
    """Box side int(H·0.5 + 0.5) (:81): 15 → 8 (H // 2 would be 7), 16 → 8, 17 → 9; offsets over
    {0 … H − size % 2} (torch.randint(0, H + (1 − size % 2)), :82-83), every one compared."""
    side = int(size * 0.5 + 0.5)
    top = size + 1 - side % 2  # offsets 0 … top − 1
    k = torch.arange(top)
    u = ((k.double() + 0.5) / top).float()
    x = _images(top, size) + 0.5  # no pixel is 0 before the cut
    got = cutout(x, torch.stack([u, u.flip(0)], 1))
    assert torch.equal(got, official_cutout(x, k, k.flip(0)))
    assert (got == 0).any()


def test_the_resize_ratio_is_shared_by_an_images_views_and_every_other_draw_is_its_own():
    """np.random.rand() once per DiffAugment call (:56), called once per image on its 50 replicas
    (clip_guide.py:45-51): one ratio per image; torch.rand/randint draw per replica (:24, :42, :82)."""
    policy = ["color", "translation", "resize", "cutout"]
    u = draw_params([3, 4], 6, policy)  # (2 images, 6 views, 3 + 2 + 1 + 2)
    assert u.shape == (2, 6, 8)
    assert torch.equal(u[:, :, 5], u[:, :1, 5].expand(2, 6)) and u[0, 0, 5] != u[1, 0, 5]
    others = [c for c in range(8) if c != 5]
    assert all(len(set(u[0, :, c].tolist())) == 6 for c in others)
    # resize alone: an image's views are all the same picture (one ratio); the other image's differ
    x = _images(2, 16, torch.float32)
    views = augment(x, ["resize"], [3, 4], 4)
    ratios = draw_params([3, 4], 4, ["resize"])[:, 0]  # (2, 1): view 0's draw of each image's key
    assert all(torch.equal(views[i], views[0]) for i in range(4)) and torch.equal(views[0], resize(x[:1], ratios[:1])[0])
    assert all(torch.equal(views[4 + i], resize(x[1:], ratios[1:])[0]) for i in range(4))
    assert not torch.equal(views[4], resize(x[1:], ratios[:1])[0])  # image 1 by its own ratio, not image 0's


def test_the_policy_order_is_the_callers_and_float16_keeps_the_integer_sizes():
    """DiffAugment applies the ops in policy order (:14-16); the sizes and shifts come from float32
    uniforms whatever the image dtype (u = 0.99 is the largest shift in both)."""
    x = _images(1, 16, torch.float32)
    u = torch.tensor([[0.99, 0.5, 0.3]])
    a = diff_augment(x, ["translation", "resize"], u)
    b = diff_augment(x, ["resize", "translation"], u[:, [2, 0, 1]])
    assert not torch.allclose(a, b)
    assert torch.allclose(a, resize(translation(x, u[:, :2]), u[:, 2:]))
    half = diff_augment(x.half(), ["translation"], u[:, :2])
    assert torch.equal(half.float() != 0, translation(x, u[:, :2]) != 0)
