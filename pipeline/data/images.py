"""Image bytes ↔ uint8 RGB arrays, with the odd cases handled and huge images refused.

Policy (documented in docs/guarantees.md, "Images"): every mode becomes 8-bit RGB — grayscale is replicated,
16-bit is scaled by 1/257, palette is expanded, alpha is composited over black (the demo
domains' background); then the short side is resized to ``size`` (bicubic) and the centre
cropped (``center_crop``), or the image is stretched to size × size (``stretch``).

- **EXIF orientation** is applied before anything else (``ImageOps.exif_transpose``), so a
  phone photo stored sideways is processed upright; ``image.exif_transpose: false`` keeps the
  pixels as stored.
- **Multi-frame files** (animated GIF/WebP/PNG, multi-page TIFF): only the first frame is
  decoded — what training pipelines take for a still image. The other frames are never read.
- **Pixel limit**: ``image.max_pixels`` is the only limit. It is checked from the header, before
  any pixel is decoded; above it the image is rejected with a reason naming the key to raise.
  Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, ~89 M pixels) is replaced by
  ``max_pixels`` for the duration of each decode, so an image within ``max_pixels`` always decodes
  and Pillow's warning/error is never what the user sees.
- **Reject reasons are deterministic**: the same bytes give the same reason on every run (no
  object reprs or addresses), so ``_rejects/*.jsonl`` is reproducible. Every reason for a file
  that could not be decoded starts with ``undecodable image``.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# tar member extensions read as the sample's image; of two in one sample the first here wins.
# Animated and multi-page formats give their first frame (decode_image).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp")

# Signatures of the formats a shard is likely to hold: they name the format in the reason
# when Pillow cannot even read the header.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))
_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")

# Image.MAX_IMAGE_PIXELS is process-global: one decode at a time may change it. Ray runs one
# task per worker process, so the lock costs nothing there; it keeps threaded callers correct.
_PILLOW_LIMIT_LOCK = threading.Lock()


class RejectedImage(ValueError):
    """An image that cannot be used; the message is the reject reason."""


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _undecodable(exc: BaseException, data: bytes, fmt: str | None) -> RejectedImage:
    """A reason that depends only on the bytes: no object reprs, no addresses."""
    if isinstance(exc, UnidentifiedImageError):  # Pillow's message embeds the BytesIO repr
        head = data[:8].hex()
        sniffed = _sniff(data)
        what = (f"{sniffed} signature but an unreadable header" if sniffed
                else "not a recognised image format")
        return RejectedImage(f"undecodable image: {what} (first bytes {head}, {len(data)} bytes)")
    msg = _ADDRESS.sub("<object>", str(exc)).strip()
    where = f"{fmt} data is corrupt or truncated" if fmt else "corrupt data"
    detail = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return RejectedImage(f"undecodable image: {where} ({detail})"[:300])


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored); unreadable EXIF counts as 1, never as a reject."""
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 — a broken EXIF block does not make the pixels unusable
        return 1


@contextlib.contextmanager
def _own_pillow_limit():
    """Hold Pillow's decompression-bomb limit for this block (set it inside), restored after;
    Pillow's DecompressionBombWarning is silenced meanwhile."""
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


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


def decode_image(data: bytes, size: int | None, resize: str = "center_crop", max_pixels: int = 50_000_000, *,
                 exif_transpose: bool = True, filter: str = "bicubic") -> np.ndarray:
    """Encoded image → (size, size, 3) uint8 (``size`` None: (H, W, 3) as stored), from the first frame,
    resized with ``filter`` (bicubic, or bilinear). Raises RejectedImage with a reason."""
    if not data:
        raise RejectedImage("no image member")
    fmt = None
    try:
        with _own_pillow_limit():
            # Header only: Pillow's limit is off, image.max_pixels is the one that decides.
            Image.MAX_IMAGE_PIXELS = None
            im = Image.open(io.BytesIO(data))  # positioned on the first frame; later ones are never read
            fmt = im.format
            w, h = im.size
            if w * h > max_pixels:
                raise RejectedImage(f"image is {w}x{h} = {w * h} pixels, above image.max_pixels = {max_pixels}; "
                                    "raise image.max_pixels to accept it")
            # Decoding: Pillow checks frames and tiles against its limit (an error above twice it);
            # within image.max_pixels they are never bigger than the image checked above.
            Image.MAX_IMAGE_PIXELS = max_pixels
            im.load()
            if exif_transpose and _orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
    except RejectedImage:
        raise
    except Image.DecompressionBombError:
        raise RejectedImage(f"image has a frame or tile larger than its header says, above "
                            f"image.max_pixels = {max_pixels}; raise image.max_pixels to accept it") from None
    except Exception as exc:  # noqa: BLE001 — any failure on untrusted bytes is a reject, never a crash
        raise _undecodable(exc, data, fmt) from None
    if size is None:
        return _to_rgb8(im)
    rgb = Image.fromarray(_to_rgb8(im))
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[filter]
    if resize == "stretch":
        out = rgb.resize((size, size), resample)
    else:
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            rgb = rgb.resize((nw, nh), resample)
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
