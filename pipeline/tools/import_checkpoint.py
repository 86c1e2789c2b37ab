"""`latentshift models import SRC DST --preset NAME`: a published checkpoint of the papers (a PyTorch
state dict) → a diffusers model folder that every job loads like any other.

The mapping of each architecture family is pure and exact (``pipeline/diffusion/imports/<family>.py``);
this module does the file work around it: fetch SRC (local or object storage), load it with
``torch.load(weights_only=True)`` only (a checkpoint is a pickle: anything that needs more than tensors
and plain containers is refused, never executed), convert, and write DST:

  model_index.json                          DDPMPipeline: unet + scheduler
  unet/config.json, unet/diffusion_pytorch_model.safetensors
  scheduler/scheduler_config.json           DDIMScheduler with the paper's β schedule
  latentshift-import.json                   the record: source, its sha256, preset/arch, what was mapped

Why by hand: diffusers' conversion scripts (scripts/convert_ddpm_original_checkpoint_to_diffusers.py)
are not part of the installed package, unpickle with full ``torch.load`` and write their own layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import tempfile
from pathlib import Path

from pipeline.diffusion.imports import adm, ddpm
from pipeline.diffusion.imports.checkpoint import normalise
from pipeline.errors import ConfigError, ModelLoadError

# --arch NAME → its module (PRESETS, convert, scheduler_config, key_map) and architecture type
FAMILIES = {"ddpm": ddpm, "adm": adm}
ARCHS = {"ddpm": ddpm.DDPMArch, "adm": adm.ADMArch}
RECORD = "latentshift-import.json"
SCHEDULER = "DDIMScheduler"  # DDIM and DPM-Encoder walk it; its config is also a DDPMScheduler's


def presets() -> dict[str, tuple[str, object]]:
    """Every preset of every family: name → (family, architecture)."""
    return {name: (family, arch) for family, module in FAMILIES.items() for name, arch in module.PRESETS.items()}


def resolve_arch(preset: str | None, arch: str | None, arch_keys: dict | None) -> tuple[str, object]:
    """``--preset NAME``, or ``--arch FAMILY`` with explicit keys (a JSON object of the family's fields)."""
    if (preset is None) == (arch is None):
        raise ConfigError("models import: give --preset NAME (one of " + ", ".join(sorted(presets())) +
                          ") or --arch " + "|".join(FAMILIES) + " with --arch-keys FILE.json")
    if preset is not None:
        known = presets()
        if preset not in known:
            raise ConfigError(f"models import: unknown preset {preset!r}; the presets are "
                              f"{', '.join(sorted(known))} (or --arch {'|'.join(FAMILIES)} with --arch-keys)")
        return known[preset]
    if arch not in FAMILIES:
        raise ConfigError(f"models import: unknown --arch {arch!r}; give one of {', '.join(FAMILIES)}")
    try:
        return arch, ARCHS[arch].from_dict(arch_keys or {})
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"models import: --arch-keys do not describe a {arch} network: {exc}") from None


def load_state(path: Path, source: str) -> object:
    """The checkpoint's object through ``torch.load(weights_only=True)``; one line for what cannot load."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: code we will not run
        first = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"{source}: the checkpoint holds more than tensors and plain containers, and latentshift "
                             "loads checkpoints only with torch.load(weights_only=True), never running code from a "
                             f"pickle ({first}); save its state dict alone (torch.save(model.state_dict(), f))") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"{source}: not a complete PyTorch checkpoint ({type(exc).__name__}: {reason}); "
                             "download it again") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_folder(folder: Path, unet_config: dict, state: dict, scheduler_config: dict, record: dict) -> None:
    """The diffusers layout. The weights fit ``unet_config`` already: every family's ``convert`` checks each
    target key and shape against UNet2DModel built from it."""
    from diffusers import __version__ as diffusers_version
    from safetensors.torch import save_file

    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    config = {"_class_name": "UNet2DModel", "_diffusers_version": diffusers_version, **unet_config}
    (folder / "unet" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": SCHEDULER, "_diffusers_version": diffusers_version, **scheduler_config}, indent=2, sort_keys=True))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers_version,
         "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", SCHEDULER]}, indent=2, sort_keys=True))
    (folder / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))


def import_checkpoint(src: str, dst: str, preset: str | None = None, arch: str | None = None,
                      arch_keys: dict | None = None, storage_options: dict | None = None, item: int = 0) -> dict:
    """SRC (a published checkpoint) → DST (a model folder, local or object storage); returns the record."""
    from pipeline.data.filesystems import explain_storage_error, url_to_fs
    from pipeline.data.model_cache import materialize_file

    family, spec = resolve_arch(preset, arch, arch_keys)
    module = FAMILIES[family]
    fs, root = url_to_fs(dst, storage_options)
    try:
        taken = fs.exists(root.rstrip("/") + "/model_index.json")
    except Exception as exc:  # noqa: BLE001 - one line naming the URI
        raise explain_storage_error(dst, exc) from None
    if taken:
        raise ConfigError(f"models import: {dst} already holds a model (model_index.json); give another DST or remove it")
    path = materialize_file(src, storage_options)
    try:
        state = normalise(load_state(path, src), item=item)
        source_keys = len(state)
        unet_config, weights = module.convert(state, spec)
    except ModelLoadError as exc:
        text = str(exc)
        raise ModelLoadError(text if text.startswith(src) else f"{src}: {text}") from None
    del state
    record = {"source": src, "sha256": sha256_of(path), "bytes": path.stat().st_size, "family": family,
              "preset": preset, "arch": dataclasses.asdict(spec), "item": item, "source_keys": source_keys,
              "mapped": {k: v[0] if isinstance(v, tuple) else v for k, v in module.key_map(spec).items()}}
    with tempfile.TemporaryDirectory(prefix="latentshift-import-") as tmp:
        folder = Path(tmp) / "model"
        write_folder(folder, unet_config, weights, module.scheduler_config(spec), record)
        try:  # the record last: a folder with it is whole
            for p in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == RECORD):
                target = f"{root.rstrip('/')}/{p.relative_to(folder).as_posix()}"
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(p), target)
        except Exception as exc:  # noqa: BLE001
            raise explain_storage_error(dst, exc) from None
    return record
