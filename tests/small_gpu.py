"""A GPU that holds only so many rows, on CPU: the model's UNet raises CUDA's own out-of-memory error
for calls of more rows (what ``ModelStage.fitting`` must survive)."""

from __future__ import annotations

import torch


def out_of_memory_above(den, rows: int) -> list[int]:
    """The UNet of ``den`` raises ``torch.cuda.OutOfMemoryError`` for calls of more than ``rows`` rows;
    returns the list the row counts of every call it is given are appended to."""
    forward, seen = den.unet.forward, []

    def limited(sample, *args, **kwargs):
        seen.append(sample.shape[0])
        if sample.shape[0] > rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (a test's limit of {rows} rows)")
        return forward(sample, *args, **kwargs)

    den.unet.forward = limited
    return seen
