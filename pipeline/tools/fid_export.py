"""``latentshift fid-export PATH``: the FID Inception network, once, online, into a safetensors file that
``eval.inception`` then names (pipeline/metrics/feature_net.py loads it, never from the network).

Sources:
  clean-fid    (default) the TorchScript clean-fid loads in its default clean mode, NVlabs'
               ``inception-2015-12-05.pt`` (cleanfid/downloads_helper.py:7): its ``layers`` tensors are
               taken under their own names. ``torch.jit.load`` runs TorchScript, not pickled Python, and only
               here, on the file the user asked for; the pipeline itself reads the safetensors file alone.
  pytorch-fid  pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (pytorch_fid/inception.py:13), a plain
               state dict (``torch.load(weights_only=True)``), renamed from torchvision's layout
               (``from_pytorch_fid``) — the same TF graph converted once more; use it where the NVlabs
               file cannot be fetched.

``--from FILE`` takes a file fetched by other means (an air-gapped cluster). Either way the written network
is checked against the source network on a seeded probe batch before the file is written: the features
must agree to 1e-4 of their scale, so a file whose names or layout differ from what this module expects is
refused, never written wrong.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.metrics import feature_net
from pipeline.metrics.feature_net import INCEPTION, FIDInception, normalise

URLS = {
    "clean-fid": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    "pytorch-fid": "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth",
}
PROBE_TOLERANCE = 1e-4  # of the features' largest magnitude

# torchvision's Inception3 (pytorch-fid's layout) → the TorchScript's ``layers`` names
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
         "Conv2d_4a_3x3": "conv_4"}
_BLOCKS = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
           "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
           "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
_BRANCHES = {  # by block kind (torchvision InceptionA…E)
    "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
          "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
          "branch_pool": "tower_2.conv"},
    "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
          "branch3x3dbl_3": "tower.conv_2"},
    "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
          **{f"branch7x7dbl_{i}": f"tower_1.conv{'' if i == 1 else f'_{i - 1}'}" for i in range(1, 6)},
          "branch_pool": "tower_2.conv"},
    "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
          **{f"branch7x7x3_{i}": f"tower_1.conv{'' if i == 1 else f'_{i - 1}'}" for i in range(1, 5)}},
    "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
          "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
          "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
          "branch_pool": "tower_2_conv"},
}
_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
         "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
_TENSORS = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}


def pytorch_fid_name(name: str) -> str | None:
    """A pytorch-fid state-dict name → the TorchScript's (None: a tensor FID does not use: ``fc``, the BN
    scale that must be 1, the batch counters)."""
    parts = name.split(".")
    tensor = ".".join(parts[-2:])
    if tensor not in _TENSORS:
        return None
    if parts[0] in _STEM and len(parts) == 3:
        return f"layers.{_STEM[parts[0]]}.{_TENSORS[tensor]}"
    if parts[0] in _BLOCKS and len(parts) == 4 and parts[1] in _BRANCHES[_KIND[parts[0]]]:
        return f"layers.{_BLOCKS[parts[0]]}.{_BRANCHES[_KIND[parts[0]]][parts[1]]}.{_TENSORS[tensor]}"
    return None


def from_pytorch_fid(state: dict) -> dict:
    """pytorch-fid's state dict → ours. Its BN scales must all be 1 (the TF graph has none): refused otherwise."""
    scales = [k for k, v in state.items() if k.endswith("bn.weight") and not torch.all(v == 1)]
    if scales:
        raise ConfigError(f"{scales[0]}: a batch-norm scale other than 1; not pytorch-fid's FID Inception weights")
    return {new: v.float() for k, v in state.items() if (new := pytorch_fid_name(k)) is not None}


def _source_network(source: str, file: Path):
    """(our tensors, the source's feature function) of the downloaded or given file."""
    if source == "clean-fid":
        scripted = torch.jit.load(str(file), map_location="cpu").eval()
        state = {k: v.float() for k, v in scripted.state_dict().items() if k.startswith("layers.")}
        return state, lambda x: scripted.layers(normalise(x)).reshape(x.shape[0], -1)
    if source == "pytorch-fid":
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return from_pytorch_fid(state), None  # its own network needs the pytorch-fid package: probed in the tests
    raise ConfigError(f"unknown source {source!r}; one of {', '.join(URLS)}")


def export(path, source: str = "clean-fid", file=None) -> dict:
    """Write the FID Inception network of ``source`` (``file``, or downloaded from its URL) to ``path``."""
    if Path(path).exists():
        raise ConfigError(f"{path}: already exists; choose another path or remove it")
    with tempfile.TemporaryDirectory() as tmp:
        if file is None:
            file = Path(tmp) / os.path.basename(URLS[source])
            try:
                urllib.request.urlretrieve(URLS[source], file)  # noqa: S310 - a fixed https URL
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"could not fetch {URLS[source]} ({type(exc).__name__}: {exc}); fetch it by other "
                                  f"means and pass it with --from FILE") from None
        file = Path(file)
        if not file.is_file():
            raise ConfigError(f"{file}: no such file")
        sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
        try:
            state, reference = _source_network(source, file)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file of another kind: one line
            raise ConfigError(f"{file}: not a {source} Inception file ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    module = FIDInception()
    problems = feature_net.mismatch(module.state_dict(), state)
    if problems:
        other = " (or try --source pytorch-fid)" if source == "clean-fid" else ""
        raise ConfigError(f"{file}: {problems} against the FID Inception network; not a {source} Inception "
                          f"file{other}")
    module.load_state_dict(state, strict=True)
    module.eval()
    difference = None
    if reference is not None:
        difference = probe_difference(module, reference)
        if difference > PROBE_TOLERANCE:
            raise ConfigError(f"{file}: the converted network's features differ from the source's by {difference:.2e} "
                              f"of their scale (above {PROBE_TOLERANCE}); nothing written")
    feature_net.save(module, path, INCEPTION, {"source": source, "source_sha256": sha256, "url": URLS[source]})
    return {"path": str(path), "source": source, "source_sha256": sha256, "probe_difference": difference}


@torch.no_grad()
def probe_difference(module, reference, n: int = 2, seed: int = 0) -> float:
    """max |ours − source| / max |source| on ``n`` seeded random 299² images in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 299, 299, generator=g) * 255
    ours, theirs = module(x), reference(x)
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))
