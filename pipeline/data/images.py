"""Image bytes ↔ uint8 RGB arrays, with the odd cases handled and huge images refused.

Policy (documented in README): every mode becomes 8-bit RGB — grayscale is replicated,
16-bit is scaled by 1/257, palette is expanded, alpha is composited over black (the demo
domains' background); then the short side is resized to ``size`` (bicubic) and the centre
cropped (``center_crop``), or the image is stretched to size × size (``stretch``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class RejectedImage(ValueError):
    """An image that cannot be used; the message is the reject reason."""


def _to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.rint(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return np.rint(rgba[..., :3] * alpha).astype(np.uint8)  # over black
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, size: int, resize: str = "center_crop", max_pixels: int = 50_000_000) -> np.ndarray:
    """Encoded image → (size, size, 3) uint8. Raises RejectedImage with a reason."""
    if not data:
        raise RejectedImage("no image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size  # header only: nothing decoded yet
            if w * h > max_pixels:
                raise RejectedImage(f"image is {w}x{h} = {w * h} pixels, above image.max_pixels = {max_pixels}")
            im.load()
    except RejectedImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise RejectedImage(f"undecodable image: {type(exc).__name__}: {exc}"[:300]) from None
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    rgb = Image.fromarray(_to_rgb8(im))
    if resize == "stretch":
        out = rgb.resize((size, size), Image.BICUBIC)
    else:
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            rgb = rgb.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = rgb.crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.uint8)


def encode_image(pixels: np.ndarray, fmt: str = "png") -> bytes:
    """(H, W, 3) uint8 → encoded bytes (png lossless; jpg/webp at quality 95)."""
    buf = io.BytesIO()
    im = Image.fromarray(pixels)
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=95)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
