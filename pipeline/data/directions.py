"""h-space direction files: safetensors tensors plus a JSON header (safetensors metadata).

kind "table": ``deltas`` (K, C, h, w) float32, Δh at the header's ``timesteps`` (a mean difference
of h between two example sets). kind "delta-block": a DeltaBlock's weights (``conv1.weight`` …) and
its sizes in the header. Every header names the model, the grid, t_edit, t_boost and how the
direction was made, so an edit can say exactly what it applied. No pickle.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.stats import read_tensor_file, write_tensor_file
from pipeline.errors import StorageError

KINDS = {"table": ("deltas",), "delta-block": ("conv1.weight", "temb_proj.weight", "conv2.weight")}
FIX = "write it with `latentshift direction fit`"


def write_direction(uri: str, storage_options: dict | None, tensors: dict[str, np.ndarray], header: dict) -> None:
    if header.get("kind") not in KINDS:
        raise ValueError(f"direction kind {header.get('kind')!r} is not one of {', '.join(KINDS)}")
    write_tensor_file(uri, storage_options, tensors, header)


def read_direction(uri: str, storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    tensors, header = read_tensor_file(uri, storage_options, (), "direction file", FIX)
    kind = header.get("kind")
    if kind not in KINDS:
        raise StorageError(f"{uri}: not an h-space direction file (kind {kind!r}); {FIX}")
    missing = [k for k in KINDS[kind] if k not in tensors]
    if missing:
        raise StorageError(f"{uri}: direction file of kind {kind!r} has no {missing[0]!r} tensor; {FIX}")
    return tensors, header
