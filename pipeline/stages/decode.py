"""Decode stage (CPU tasks): image bytes → fixed-size uint8 pixels, or a reject reason."""

from __future__ import annotations

import numpy as np

from pipeline.data.images import RejectedImage, decode_image


def decode_images(batch: dict, size: int, resize: str, max_pixels: int) -> dict:
    n = len(batch["key"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = np.array([str(e) for e in batch["error"]], dtype=object)
    for i in range(n):  # PIL decodes one image at a time; this is the CPU stage's whole job
        if errors[i]:
            continue
        try:
            pixels[i] = decode_image(bytes(batch["image"][i]), size, resize, max_pixels)
        except RejectedImage as exc:
            errors[i] = str(exc)
    return {"shard": batch["shard"], "key": batch["key"], "index": batch["index"], "extras": batch["extras"],
            "error": errors, "pixels": pixels}
