"""Image decoding policy: every mode to 8-bit RGB, resize + crop, huge and broken images rejected;
EXIF orientation applied, first frame of multi-frame files, deterministic reject reasons."""

from __future__ import annotations

import io
import warnings

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
    with pytest.raises(RejectedImage, match=r"3000x2000 = 6000000 pixels, above image.max_pixels = 1000000; "
                                             r"raise image.max_pixels to accept it$"):
        decode_image(big, 16, max_pixels=1_000_000)


@pytest.mark.parametrize("data,reason", [(b"", "no image member"), (b"not an image", "undecodable image"),
                                         (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "undecodable image")])
def test_broken_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage, match=reason):
        decode_image(data, 16)


def test_cmyk_becomes_rgb():
    cyan = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    assert decode_image(encoded(cyan, "TIFF"), 4)[0, 0].tolist() == [0, 255, 255]


def _png(w: int, h: int) -> bytes:
    return encoded(Image.fromarray(np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)))


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                  _png(16, 16)[:60], _png(16, 16)[:400]],
                         ids=["text", "png-magic-only", "png-header-only", "png-truncated"])
def test_reject_reasons_are_deterministic(data):
    """No object repr or address in a reason: the same bytes give the same _rejects line every run."""
    reasons = []
    for _ in range(2):
        with pytest.raises(RejectedImage) as err:
            decode_image(bytes(bytearray(data)), 16)  # a fresh buffer each time, as from a new read
        reasons.append(str(err.value))
    assert reasons[0] == reasons[1]
    assert reasons[0].startswith("undecodable image")
    assert "0x" not in reasons[0] and " object" not in reasons[0]


def test_unrecognised_bytes_name_the_problem():
    with pytest.raises(RejectedImage) as err:
        decode_image(b"not an image", 16)
    assert str(err.value) == "undecodable image: not a recognised image format (first bytes 6e6f7420616e2069, 12 bytes)"
    with pytest.raises(RejectedImage, match=r"^undecodable image: PNG signature but an unreadable header"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 16)
    with pytest.raises(RejectedImage, match=r"^undecodable image: PNG data is corrupt or truncated \(OSError: "):
        decode_image(_png(16, 16)[:400], 16)


def _sideways_jpeg(orientation: int) -> bytes:
    """32 wide × 16 tall, left half white, stored with an EXIF orientation tag."""
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation,bright", [(6, "top"), (8, "bottom")])
def test_exif_orientation_is_applied(orientation, bright):
    data = _sideways_jpeg(orientation)
    upright = decode_image(data, 16, resize="stretch").mean(axis=(1, 2))  # one value per row
    top, bottom = upright[:8].mean(), upright[8:].mean()
    assert (top > 200 and bottom < 55) if bright == "top" else (bottom > 200 and top < 55)
    # center_crop of the upright 16×32 image keeps the middle rows: half white, half black
    assert decode_image(data, 16).mean(axis=(1, 2))[0 if bright == "top" else -1] > 200


def test_exif_orientation_can_be_turned_off():
    stored = decode_image(_sideways_jpeg(6), 16, resize="stretch", exif_transpose=False).mean(axis=(0, 2))  # per column
    assert stored[:8].mean() > 200 and stored[8:].mean() < 55


def test_exif_transpose_is_a_config_key():
    from pipeline.config import ImageConfig

    assert ImageConfig().exif_transpose is True and ImageConfig(exif_transpose=False).exif_transpose is False


def test_animated_gif_decodes_its_first_frame():
    frames = []
    for colour in (1, 2, 3):  # frame 0 red, then green, then blue; palette index 0 is transparent
        im = Image.new("P", (8, 8), colour)
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        im.paste(0, (0, 0, 4, 8))  # left half transparent
        frames.append(im)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], transparency=0, duration=50,
                   loop=0, disposal=2)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = decode_image(buf.getvalue(), 8)
    assert out[:, 4:].reshape(-1, 3).tolist() == [[255, 0, 0]] * 32  # frame 0's red
    assert out[:, :4].max() == 0  # its transparent half, over black


def test_multipage_tiff_decodes_its_first_page():
    pages = [Image.new("RGB", (6, 4), c) for c in ((10, 20, 30), (200, 100, 50))]
    data = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data, 4)[0, 0].tolist() == [10, 20, 30]


def test_damaged_later_page_does_not_matter():
    """Only the first frame is read: a broken pointer to page 2 neither crashes the task nor rejects."""
    pages = [Image.new("RGB", (16, 16), c) for c in ((10, 20, 30), (200, 100, 50))]
    data = bytearray(encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    ifd = int.from_bytes(data[4:8], "little")  # first IFD: entry count, entries, then next-IFD offset
    entries = int.from_bytes(data[ifd:ifd + 2], "little")
    data[ifd + 2 + 12 * entries:ifd + 6 + 12 * entries] = (len(data) + 1000).to_bytes(4, "little")
    assert decode_image(bytes(data), 4)[0, 0].tolist() == [10, 20, 30]


def test_animated_webp_decodes_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 0, 250))]
    data = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    if getattr(Image.open(io.BytesIO(data)), "n_frames", 1) < 2:
        pytest.skip("this Pillow writes no animated WebP")
    assert decode_image(data, 8)[4, 4].tolist() == [250, 0, 0]


def test_pillow_bomb_limit_never_decides(monkeypatch):
    """Above Pillow's limit (here shrunk to 64 pixels) but within image.max_pixels: decodes, silently."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    data = _png(20, 20)  # 400 pixels: over twice Pillow's limit, a DecompressionBombError today
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, 8, max_pixels=400).shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 64  # restored


def test_above_max_pixels_names_the_key_to_raise(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)  # Pillow's limit is lower still: ours is what shows
    with pytest.raises(RejectedImage) as err:
        decode_image(_png(20, 10), 8, max_pixels=199)
    assert str(err.value) == ("image is 20x10 = 200 pixels, above image.max_pixels = 199; "
                              "raise image.max_pixels to accept it")
    assert Image.MAX_IMAGE_PIXELS == 64


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_encode_formats(fmt):
    arr = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(encode_image(arr, fmt))).convert("RGB"))
    assert back.shape == arr.shape
    if fmt == "png":
        assert np.array_equal(back, arr)
