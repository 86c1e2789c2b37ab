"""Image decoding policy: every mode to 8-bit RGB, resize + crop, huge and broken images rejected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import RejectedImage, decode_image, encode_image


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_at_size_is_unchanged():
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encoded(Image.fromarray(arr)), 16), arr)


def test_grayscale_is_replicated():
    g = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    out = decode_image(encoded(Image.fromarray(g)), 8)
    assert out.shape == (8, 8, 3) and all(np.array_equal(out[..., c], g) for c in range(3))


def test_sixteen_bit_is_scaled_not_clipped():
    deep = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16).repeat(4, 0)
    out = decode_image(encoded(Image.fromarray(deep)), 4, resize="stretch")
    assert out[0, :, 0].tolist() == [0, 128, 255, round(1000 / 257)]


def test_rgba_is_composited_over_black():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    out = decode_image(encoded(Image.fromarray(rgba)), 4)
    assert out[0, 0].tolist() == [round(200 * 128 / 255), 0, 0]


def test_palette_with_transparency():
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.info["transparency"] = 0
    assert decode_image(encoded(im, transparency=0), 4)[0, 0].tolist() == [255, 0, 0]


def test_short_side_resize_and_centre_crop():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # the central 20 columns are white
    out = decode_image(encoded(Image.fromarray(arr)), 10)
    assert out.shape == (10, 10, 3) and out.min() > 200  # the crop kept the centre
    stretched = decode_image(encoded(Image.fromarray(arr)), 10, resize="stretch")
    assert stretched[:, 0].max() < 60  # stretching keeps the black sides


def test_huge_images_are_rejected_from_the_header():
    big = encoded(Image.new("RGB", (3000, 2000)), "PNG")
    with pytest.raises(RejectedImage, match=r"3000x2000 = 6000000 pixels, above image.max_pixels = 1000000"):
        decode_image(big, 16, max_pixels=1_000_000)


@pytest.mark.parametrize("data,reason", [(b"", "no image member"), (b"not an image", "undecodable image"),
                                         (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "undecodable image")])
def test_broken_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        decode_image(data, 16)


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encode_formats(fmt):
    arr = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(encode_image(arr, fmt))).convert("RGB"))
    assert back.shape == arr.shape
    if fmt == "png":
        assert np.array_equal(back, arr)
