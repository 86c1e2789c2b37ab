"""What every family's conversion shares: the state dict inside what a published checkpoint holds (DDPM
and ADM files come in the same wrappers), and the shapes the diffusers model it becomes must have."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.errors import ModelLoadError


def normalise(obj, *, item: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    """What ``torch.load(path, weights_only=True)`` returned → the state dict, float32, plain keys.

    Accepts a plain state dict, ``{"state_dict": …}``, a list/tuple whose ``item``-th entry (the first
    by default) is one — ermongroup/ddim's own training checkpoints are ``[model, optimizer, epoch,
    step, ema]`` (runners/diffusion.py:175-182, read at :210-215), so their EMA weights are
    ``item=-1`` —, ``module.`` (DataParallel) prefixes and float16/bfloat16/float64 tensors.
    ``prefix`` keeps only the keys behind it (e.g. ``"model."``), stripped. Anything else is one line.
    """
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ModelLoadError("not a state dict: the checkpoint is an empty list")
        obj = obj[item]
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"not a state dict: the checkpoint holds a {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"not a state dict: {key!r} is a {type(value).__name__}, not a tensor")
        if name in out:
            raise ModelLoadError(f"not a state dict: key {name!r} occurs twice (with and without 'module.')")
        out[name] = value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if not out:
        raise ModelLoadError("not a state dict: no tensors" + (f" behind {prefix!r}" if prefix else ""))
    return out


def target_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of ``UNet2DModel(**config)``, built on the meta device (no memory)."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        model = UNet2DModel(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
