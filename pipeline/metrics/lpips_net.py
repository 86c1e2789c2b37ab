"""LPIPS (Zhang et al. 2018, the ``lpips`` package) loaded from one local safetensors file.

The ``lpips`` package ships its linear layers but takes the backbone (AlexNet/VGG/SqueezeNet) from
torchvision, which downloads it on first use. latentshift never downloads at run time, so the
whole network (backbone + linear layers + scaling) lives in one safetensors file:

    export_lpips("lpips-alex.safetensors", net="alex")   # once, on a machine that is online
    model = load_lpips("lpips-alex.safetensors")          # anywhere, offline
    d = lpips_distance(model, a, b)                        # (B,), images in [-1, 1]

``load_lpips`` builds ``lpips.LPIPS(pretrained=False, pnet_rand=True)`` (random, nothing fetched)
and loads the file into it, strictly. The official Asyrp code measures with ``lpips.LPIPS(net='alex')``
(diffusion_latent.py:1205), the network ``export_lpips`` writes.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch

from pipeline.errors import ConfigError

NETS = ("alex", "vgg", "squeeze")
_KEY = "hspace.lpips"
_FIX = "write one once, online, with pipeline.metrics.lpips_net.export_lpips(PATH, net=...): latentshift never downloads at run time"


class FrozenLPIPS(lpips.LPIPS):
    """An ``lpips.LPIPS`` that stays in eval mode (its linear layers carry dropout)."""

    def train(self, mode: bool = True):
        return super().train(False)


def _build(net: str):
    """The LPIPS module of ``net`` with random weights: nothing is downloaded."""
    if net not in NETS:
        raise ConfigError(f"config error: LPIPS net {net!r}: one of {', '.join(NETS)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # pretrained= kwarg
        return FrozenLPIPS(pretrained=False, pnet_rand=True, net=net, verbose=False)


def save_lpips(model: torch.nn.Module, path, net: str) -> str:
    """Write ``model``'s whole state dict to safetensors (``lin0…`` and ``lins.0…`` are the same
    tensors in LPIPS; safetensors refuses shared storage, so each is written as its own copy)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "lpips_net": net, "lpips_version": "0.1"})
    return str(path)


def export_lpips(path, net: str = "alex") -> str:
    """Build the real ``lpips.LPIPS(net=net)`` and write it whole to the safetensors file ``path``.

    NEEDS THE NETWORK once: torchvision downloads the ImageNet backbone weights (into its torch
    hub cache); the linear layers come with the ``lpips`` package.
    """
    if net not in NETS:
        raise ConfigError(f"config error: LPIPS net {net!r}: one of {', '.join(NETS)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, verbose=False)
    return save_lpips(model, path, net)


def load_lpips(path, net: str = "alex", device=None) -> torch.nn.Module:
    """A frozen LPIPS network (eval, no parameter gradients) from the safetensors file ``path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None or str(path).strip() == "":
        raise ConfigError(f"config error: {_KEY} is not set; give the path of an LPIPS safetensors file ({_FIX})")
    file = _safetensors_file(path, str(path))
    model = _build(net)
    try:
        with safe_open(str(file), framework="pt") as f:
            saved_net = (f.metadata() or {}).get("lpips_net")
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"config error: {_KEY} {str(path)!r}: not a readable safetensors file ({exc})") from None
    if saved_net is not None and saved_net != net:
        raise ConfigError(f"config error: {_KEY} {str(path)!r} holds an LPIPS-{saved_net} network, not LPIPS-{net}; "
                          "set the net to match or export the other one with export_lpips")
    problems = _mismatch(model.state_dict(), state)
    if problems:
        raise ConfigError(f"config error: {_KEY} {str(path)!r}: {problems}; the file must hold a whole LPIPS "
                          f"network (backbone and linear layers) as written by export_lpips(PATH, net={net!r})")
    model.load_state_dict(state, strict=True)
    dev = torch.device(device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.eval().requires_grad_(False).to(dev)


def _safetensors_file(path, shown: str) -> Path:
    """``path`` as a local .safetensors file that exists; else one line naming ``shown`` and the fix."""
    file = Path(os.path.expanduser(str(path)))
    if not file.is_file():
        raise ConfigError(f"config error: {_KEY} {shown!r}: no such file; {_FIX}")
    if file.suffix.lower() != ".safetensors":
        raise ConfigError(f"config error: {_KEY} {shown!r}: expected a .safetensors file as written by "
                          f"export_lpips ({_FIX})")
    return file


def check_lpips_file(path, net: str = "alex", shown: str | None = None) -> None:
    """Preflight of what ``load_lpips`` will load, without reading a tensor: a .safetensors file whose
    header and tensor extents are sound, of LPIPS-``net``, whose tensors fit that network built on the
    meta device. ``shown``: the file as the user wrote it (an s3:// URI), for messages."""
    from safetensors import safe_open

    shown = str(shown or path)
    file = _safetensors_file(path, shown)
    try:
        with safe_open(str(file), framework="pt") as f:
            saved_net = (f.metadata() or {}).get("lpips_net")
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a mapping
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types for a damaged or truncated file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config error: {_KEY} {shown!r}: not a readable safetensors file ({first}); "
                          f"it may be truncated: copy it again or {_FIX}") from None
    if saved_net is not None and saved_net != net:
        raise ConfigError(f"config error: {_KEY} {shown!r} holds an LPIPS-{saved_net} network, not LPIPS-{net} "
                          f"(hspace.lpips_net); set hspace.lpips_net: {saved_net} or export the other one")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _build(net).state_dict().items()}
    problems = _mismatch(expected, found)
    if problems:
        raise ConfigError(f"config error: {_KEY} {shown!r}: {problems}; the file must hold a whole LPIPS "
                          f"network (backbone and linear layers) as written by export_lpips(PATH, net={net!r})")


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v, "shape", v))


def _mismatch(expected: dict, found: dict) -> str:
    """Tensors of ``found`` that ``expected`` lacks, or the reverse, or of another shape (values: tensors or shapes)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and _shape(found[k]) != _shape(expected[k])]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            parts.append(f"{len(keys)} {label} tensors (e.g. {keys[0]})")
    return ", ".join(parts)


MIN_SIZE = 64


def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS distance (B,) of (B, 3, H, W) images in [-1, 1] (the lpips convention).
    Not wrapped in no_grad: it differentiates if the caller needs it to."""
    dev = next(model.parameters()).device
    a, b = a.to(dev), b.to(dev)
    if min(a.shape[-2:]) < MIN_SIZE:  # AlexNet's third pooling needs about 64 px: small images are upsampled
        scale = MIN_SIZE / min(a.shape[-2:])
        a, b = (torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) for x in (a, b))
    return model(a, b).reshape(a.shape[0])
