"""Tensor files (safetensors + a JSON header); OOD statistics files: safetensors tensors ``mean``, ``variance``, ``reference`` plus a JSON header.

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
    write_tensor_file(uri, storage_options, tensors, header)


def read_stats(uri: str, storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    return read_tensor_file(uri, storage_options, ("mean", "variance", "reference"), "stats file",
                            "fit it again with `latentshift ood fit`")


def write_tensor_file(uri: str, storage_options: dict | None, tensors: dict[str, np.ndarray], header: dict) -> None:
    """Named arrays and a JSON header as one safetensors file (OOD statistics, h-space directions)."""
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


def read_tensor_file(uri: str, storage_options: dict | None, required: tuple[str, ...], what: str,
                     fix: str) -> tuple[dict[str, np.ndarray], dict]:
    """A file ``write_tensor_file`` wrote: its arrays and header; ``required`` arrays must be there."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        data = get_bytes(fs, path)
    except Exception as exc:  # noqa: BLE001
        raise explain_storage_error(uri, exc) from None
    try:
        tensors = load_safetensors(data)
        header = _header(data)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{uri}: not a latentshift {what} ({type(exc).__name__}: {exc})") from None
    for name in required:
        if name not in tensors:
            raise StorageError(f"{uri}: {what} has no {name!r} tensor; {fix}")
    return tensors, header


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    if HEADER_KEY not in meta:
        raise ValueError("no latentshift header")
    return json.loads(meta[HEADER_KEY])


def tensors_to_bytes(tensors: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    """A partial result for the driver (PARTIAL rows): safetensors bytes with a JSON header, never pickle."""
    return save_safetensors({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                            metadata={HEADER_KEY: json.dumps(meta or {}, sort_keys=True)})


def tensors_from_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    data = bytes(data)
    return load_safetensors(data), _header(data)
