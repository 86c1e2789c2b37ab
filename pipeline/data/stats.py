"""OOD statistics files: safetensors tensors ``mean``, ``variance``, ``reference`` plus a JSON header.

The header (safetensors metadata key ``latentshift``) holds count, t0 (requested and on-grid),
the timesteps of the inversion, model, inversion settings, latent shape and the measured
geometry the sampler targets. No pickle anywhere; arrays in and out are numpy.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from pipeline.data.filesystems import explain_storage_error, get_bytes, put_bytes, url_to_fs
from pipeline.errors import StorageError

HEADER_KEY = "latentshift"


def write_stats(uri: str, storage_options: dict | None, tensors: dict[str, np.ndarray], header: dict) -> None:
    data = save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                            metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    fs, path = url_to_fs(uri, storage_options)
    try:
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        put_bytes(fs, path, data)
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None


def read_stats(uri: str, storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = get_bytes(fs, path)
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None
    try:
        tensors = load_safetensors(data)
        header = _header(data)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{uri}: not a latentshift stats file ({type(exc).__name__}: {exc})") from None
    for name in ("mean", "variance", "reference"):
        if name not in tensors:
            raise StorageError(f"{uri}: stats file has no {name!r} tensor; fit it again with `latentshift ood fit`")
    return tensors, header


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    if HEADER_KEY not in meta:
        raise ValueError("no latentshift header")
    return json.loads(meta[HEADER_KEY])
