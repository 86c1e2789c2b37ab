"""Model sources → checked local diffusers folders, before any model is loaded.

``resolve_model`` does everything about a model that can fail without torch: it turns a
source (``bundled:<name>``, a local folder or ``file://``, an ``s3://`` / ``gs://`` folder,
a hub id) into a local folder, checks its component layout against its model family
(``pipeline/model_layout.py``, the description the denoiser loads by), and applies the pickle policy
(safetensors only unless ``allow_pickle``). It reads JSON, lists files and opens the headers of
the safetensors files (no tensor is read), so a preflight can call it cheaply before Ray
starts; ``pipeline.diffusion.load_denoiser`` then assembles the returned folder into a
``Denoiser``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.filesystems import is_remote
from pipeline.errors import ModelLoadError
from pipeline.model_layout import COMPONENTS, check_needs, read_json, unet_family, weight_components

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class ModelFolder:
    """A local diffusers folder that passed every check ``load_denoiser`` would otherwise fail."""

    source: str  # the source as the user wrote it (for messages and provenance)
    path: Path  # a local diffusers folder
    components: tuple[str, ...]  # e.g. ("unet", "scheduler") or ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
    allow_pickle: bool


def resolve_model(
    source: str,
    storage_options: dict | None = None,
    *,
    allow_pickle: bool = False,
    cache_dir: Path | None = None,
) -> ModelFolder:
    """Resolve ``source`` to a local folder and check it; raises ModelLoadError / StorageError."""
    folder = resolve_model_folder(source, storage_options, cache_dir)
    comps = _components(folder, source)
    family, _ = unet_family(comps["unet"], source)
    check_needs(family, comps, source)
    for name in weight_components(family, comps):  # the ones load_denoiser loads
        _check_weights(comps[name], name, source, allow_pickle)
    return ModelFolder(source=source, path=folder, components=tuple(comps), allow_pickle=allow_pickle)


def resolve_model_folder(source: str, storage_options: dict | None = None, cache_dir: Path | None = None) -> Path:
    """A local folder for ``source``: bundled, local path, file://, object storage (cached) or hub id."""
    if source.startswith("bundled:"):  # models this project trained and ships (pipeline/assets/<name>)
        name = source.split(":", 1)[1]
        folder = BUNDLED_DIR / name
        if not (folder / "model_index.json").exists():
            raise ModelLoadError(f"model {source!r}: no bundled model {name!r} in {folder.parent}; "
                                 f"train it with `latentshift train-demo --domain {name}`")
        return folder
    if is_remote(source):
        from pipeline.data.model_cache import materialize

        return materialize(source, storage_options, cache_dir)
    local = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"model {source!r} is a file; give the diffusers folder that holds model_index.json")
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return _download_from_hub(source)
    raise ModelLoadError(f"model {source!r}: no such folder; give a local diffusers folder, an s3:// or gs:// folder, or a hub id")


def _download_from_hub(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = f"model {repo_id!r} is neither a local folder nor reachable on the model hub"
    if offline:
        raise ModelLoadError(f"{hint} (HF_HUB_OFFLINE is set); download it elsewhere and pass its local folder or s3:// copy")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo or gated: one line either way
        raise ModelLoadError(f"{hint} ({type(exc).__name__}); pass a local folder or an s3:// copy of it") from None


def _components(folder: Path, source: str) -> dict[str, Path]:
    """Component name → subfolder, from model_index.json or the unet/ + scheduler/ layout."""
    index = folder / "model_index.json"
    if index.exists():
        spec = read_json(index)
        comps = {k: folder / k for k in COMPONENTS if isinstance(spec.get(k), list) and spec[k][0] is not None}
    else:
        comps = {k: folder / k for k in COMPONENTS if (folder / k).is_dir()}
    if "unet" not in comps or "scheduler" not in comps:
        raise ModelLoadError(
            f"model {source!r}: not a diffusers model folder (expected model_index.json, or unet/ and scheduler/ subfolders)"
        )
    for k, p in comps.items():
        if not p.is_dir():
            raise ModelLoadError(f"model {source!r}: component {k!r} is listed but {p.name}/ is missing")
    return comps


def _check_safetensors(path: Path, name: str, source: str) -> None:
    """The file's header parses and its tensors fit the file (safetensors checks both when opening;
    no tensor is read), so a damaged or truncated download fails here, not on an actor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise ModelLoadError(f"model {source!r}: {name} is not a valid safetensors file ({exc}); "
                             "download or export it again") from None


def _check_weights(component: Path, name: str, source: str, allow_pickle: bool) -> bool:
    """True when safetensors load; refuse pickle-only weights unless explicitly allowed."""
    files = sorted(p.name for p in component.iterdir() if p.is_file())
    safetensors = [f for f in files if f.endswith(".safetensors")]
    for f in safetensors:
        _check_safetensors(component / f, f"{name}/{f}", source)
    if safetensors:
        return True
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not pickled:
        raise ModelLoadError(f"model {source!r}: no weights in {name}/ (expected *.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"model {source!r}: {name}/ has only pickle-based weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors, or set allow_pickle: true for this model if you trust the file"
        )
    log.warning("model %s: loading pickle-based weights from %s/ because allow_pickle is set", source, name)
    return False


def unet_conditioning(folder: ModelFolder) -> str:
    """What the model's UNet is conditioned on, from its config alone (no torch): "text" (a
    UNet2DConditionModel with its text encoder), "class" (class embeddings) or "none"."""
    family, config = unet_family(folder.path / "unet", folder.source)
    return family.conditioning(config)
