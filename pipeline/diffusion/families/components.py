"""The component folders of one local diffusers model, loaded frozen: what every family adapter
and the first stage load their networks through.

Only local folders: resolving a source (``bundled:``, ``s3://``, hub ids) and the pickle policy's
messages belong to ``pipeline.data.model_store.resolve_model``, whose ``ModelFolder`` is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ModelLoadError
from pipeline.model_layout import COMPONENTS, CONFIG, read_json


@dataclass(frozen=True)
class Components:
    """Component name → subfolder of a local model folder, and how its networks are loaded."""

    source: str  # the model as the user named it, for messages
    folders: dict[str, Path]
    allow_pickle: bool
    device: torch.device
    dtype: torch.dtype

    def __contains__(self, name: str) -> bool:
        return name in self.folders

    def config(self, name: str, file: str = CONFIG) -> dict:
        return read_json(self.folders[name] / file)

    def load(self, cls, name: str) -> torch.nn.Module:
        """``cls.from_pretrained`` of the ``name`` folder on the device, in eval mode, every weight frozen."""
        safe = _use_safetensors(self.folders[name], name, self.source, self.allow_pickle)
        try:
            model = cls.from_pretrained(self.folders[name], use_safetensors=safe, local_files_only=True,
                                        torch_dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"model {self.source!r}: cannot load {name}/ as {cls.__name__}: {exc}") from None
        return model.to(self.device).eval().requires_grad_(False)


def local_folder(folder, source: str | None, allow_pickle: bool) -> tuple[Path, str, bool]:
    """(path, source, allow_pickle) of a local folder or a ModelFolder-like object."""
    if hasattr(folder, "path") and hasattr(folder, "source"):  # pipeline.data.model_store.ModelFolder
        path = Path(folder.path)
        src = source or str(folder.source)
        allow_pickle = allow_pickle or bool(getattr(folder, "allow_pickle", False))
    elif isinstance(folder, (str, os.PathLike)):
        path = Path(folder)
        src = source or str(folder)
    else:
        raise TypeError(f"load_denoiser takes a local folder or a ModelFolder, not {type(folder).__name__}")
    if not path.is_dir():
        raise ModelLoadError(
            f"model {src!r}: not a local folder; load_denoiser reads local diffusers folders only: give one, or resolve "
            f"the source first with pipeline.data.model_store.resolve_model({src!r}) (bundled:, s3://, gs://, hub ids) "
            "and pass its result"
        )
    return path, src, allow_pickle


def subfolders(folder: Path, source: str) -> dict[str, Path]:
    """Component name → subfolder: the subfolders the (resolved) folder has.

    Which components a model_index.json lists, and whether they are all there, is checked by
    ``pipeline.data.model_store.resolve_model``; this only needs to know what to assemble.
    """
    comps = {k: folder / k for k in COMPONENTS if (folder / k).is_dir()}
    if "unet" not in comps or "scheduler" not in comps:
        raise ModelLoadError(
            f"model {source!r}: not a diffusers model folder (expected unet/ and scheduler/ subfolders); "
            "pipeline.data.model_store.resolve_model checks a folder and says what is missing"
        )
    return comps


def _use_safetensors(component: Path, name: str, source: str, allow_pickle: bool) -> bool:
    """Load safetensors whenever the folder has them; anything else only with ``allow_pickle``.

    The pickle policy and its messages live in ``resolve_model``; this only makes sure an
    unresolved local folder cannot slip pickle weights past it.
    """
    if any(p.suffix == ".safetensors" for p in component.iterdir() if p.is_file()):
        return True
    if not allow_pickle:
        raise ModelLoadError(
            f"model {source!r}: no *.safetensors weights in {name}/; check the folder with "
            "pipeline.data.model_store.resolve_model, which explains the pickle policy (allow_pickle)"
        )
    return False
