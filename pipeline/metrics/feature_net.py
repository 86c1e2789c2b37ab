"""The feature networks FID and KID are measured with, loaded from one safetensors file.

  inception-v3-fid   the TF Inception (2015-12-05) graph FID is defined on, as the TorchScript clean-fid
                     loads (NVlabs' ``inception-2015-12-05.pt``, cleanfid/inception_torchscript.py): its
                     ``layers`` module, tensor for tensor under the same names, 2048-d pool3 features
  tiny-conv          a few strided 3×3 convolutions and a global mean: a stand-in for tests and the demo,
                     where a 95 MB network would dwarf 64-pixel images (say so beside any figure it gives)

Both take what clean-fid hands its feature network: float (N, 3, 299, 299) in [0, 255], already resized
(cleanfid/features.py ``feature_extractor`` → ``InceptionV3W.forward`` with ``resize_inside=False``,
inception_torchscript.py:36-52), normalise it as clean-fid does, ``(x − 128) / 128``, and return
float32 (N, D). So the module a job loads can be passed to clean-fid as its ``custom_feat_extractor``,
which is how the tests compare the two end to end.

The file is safetensors, never a pickle: its metadata names the architecture (``latentshift.features``)
and its settings; ``latentshift fid-export`` writes the Inception one once, online (pipeline/tools/
fid_export.py). Loading checks every name and shape against the architecture built on the meta device.

Why written out rather than imported: clean-fid's network *is* the TorchScript file (code and weights in
one archive, loaded by ``torch.jit.load``), pytorch-fid's and torchvision's rebuild it under other names
and fetch their weights from the network on construction; neither loads from a safetensors file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import ConfigError

INCEPTION = "inception-v3-fid"
TINY = "tiny-conv"
ARCHITECTURES = (INCEPTION, TINY)
META_ARCH = "latentshift.features"
META_CONFIG = "latentshift.features.config"
KEY = "eval.inception"
FIX = "write one once, online, with `latentshift fid-export PATH` (latentshift never downloads at run time)"


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] → about [−1, 1], as clean-fid before the Inception layers (inception_torchscript.py:49-50)."""
    return (x - 128) / 128


class ConvBN(nn.Module):
    """Convolution without bias, batch norm with a shift and no scale, ReLU: the TF graph's conv unit.
    Its tensors are named as in the TorchScript (``weight``, ``beta``, ``mean``, ``var``); BN ε = 0.001."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.empty(cout, cin, *k))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _seq(**modules) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def _avg3() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # TF's SAME average pool


class BlockA(nn.Module):  # mixed, mixed_1, mixed_2 (35×35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, padding=1))
        self.tower_2 = _seq(pool=_avg3(), conv=ConvBN(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):  # mixed_3: 35 → 17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1), conv_2=ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):  # mixed_4 … mixed_7 (17×17, factorised 7×7)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (1, 7), padding=(0, 3)),
                          conv_2=ConvBN(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_2=ConvBN(c7, c7, (1, 7), padding=(0, 3)), conv_3=ConvBN(c7, c7, (7, 1), padding=(3, 0)),
                            conv_4=ConvBN(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _seq(pool=_avg3(), conv=ConvBN(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):  # mixed_8: 17 → 8
    def __init__(self, cin: int):
        super().__init__()
        self.tower = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
                            conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvBN(192, 192, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):
    """mixed_9 (average pool) and mixed_10 (max pool: the 2015 graph's quirk that pytorch-fid's
    ``FIDInceptionE_2`` also keeps), 8×8; flat names, as the TorchScript's."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg3() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class FIDInception(nn.Module):
    """float (N, 3, 299, 299) in [0, 255] → (N, 2048) pool3 features."""

    dims = 2048

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=BlockA(192, 32), mixed_1=BlockA(256, 64), mixed_2=BlockA(288, 64), mixed_3=BlockB(288),
            mixed_4=BlockC(768, 128), mixed_5=BlockC(768, 160), mixed_6=BlockC(768, 160), mixed_7=BlockC(768, 192),
            mixed_8=BlockD(768), mixed_9=BlockE(1280, "avg"), mixed_10=BlockE(2048, "max"),
            pool2=nn.AvgPool2d(8, stride=8))

    def forward(self, x):
        if tuple(x.shape[-2:]) != (299, 299):
            raise ValueError(f"the FID Inception network takes 299×299 images, got {tuple(x.shape[-2:])}")
        return self.layers(normalise(x.float())).reshape(x.shape[0], self.dims)


class TinyFeatures(nn.Module):
    """float (N, 3, H, W) in [0, 255] → (N, widths[-1]): strided 3×3 convolutions with ReLU, then the mean
    over the image (``unit``: scaled to unit length, so that only the features' proportions count). Not a
    perceptual network: a stand-in whose figures compare runs measured with the same file, nothing else."""

    def __init__(self, widths: list[int], unit: bool = False):
        super().__init__()
        self.unit = unit
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [(f"conv{i}", nn.Conv2d(cin, w, 3, stride=2, padding=1)), (f"relu{i}", nn.ReLU())]
            cin = w
        self.layers = nn.Sequential(OrderedDict(layers))
        self.dims = cin

    def forward(self, x):
        f = self.layers(normalise(x.float())).mean(dim=(2, 3))
        return F.normalize(f, dim=1, eps=1e-12) if self.unit else f


def build(arch: str, config: dict | None = None) -> nn.Module:
    """The architecture ``arch`` with uninitialised weights (build it under ``torch.device("meta")`` to
    check shapes without memory)."""
    config = config or {}
    if arch == INCEPTION:
        return FIDInception()
    if arch == TINY:
        widths = config.get("widths")
        if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
            raise ConfigError(f"a {TINY} feature network needs its widths (a list of positive integers), got {widths!r}")
        return TinyFeatures(widths, unit=bool(config.get("unit", False)))
    raise ConfigError(f"unknown feature network {arch!r}; one of {', '.join(ARCHITECTURES)}")


def save(module: nn.Module, path, arch: str, config: dict | None = None) -> str:
    """Write ``module``'s tensors and its architecture to the safetensors file ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={META_ARCH: arch, META_CONFIG: json.dumps(config or {}, sort_keys=True)})
    return str(path)


def random_tiny(path, widths: tuple[int, ...] = (8, 16), seed: int = 0) -> str:
    """A tiny-conv network with seeded random weights (PyTorch's default init), written to ``path``."""
    torch.manual_seed(seed)
    return save(TinyFeatures(list(widths)), path, TINY, {"widths": list(widths)})


def describe(path, shown: str | None = None) -> tuple[str, dict, dict[str, tuple[int, ...]]]:
    """(architecture, its settings, tensor shapes) from the header, reading no tensor; checks that the
    shapes are the architecture's. One line naming ``eval.inception`` and the fix otherwise."""
    from safetensors import safe_open

    shown = str(shown or path)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config error: {KEY} {shown!r}: no such file; {FIX}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a mapping
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types: not safetensors, truncated
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config error: {KEY} {shown!r}: not a readable safetensors file ({first}); "
                          f"copy it again or {FIX}") from None
    arch = meta.get(META_ARCH)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"config error: {KEY} {shown!r}: not a latentshift feature network (its metadata names "
                          f"{arch!r}, expected one of {', '.join(ARCHITECTURES)}); {FIX}")
    try:
        config = json.loads(meta.get(META_CONFIG) or "{}")
    except json.JSONDecodeError:
        raise ConfigError(f"config error: {KEY} {shown!r}: its {META_CONFIG} metadata is not JSON; {FIX}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(arch, config).state_dict().items()}
    problems = mismatch(expected, found)
    if problems:
        raise ConfigError(f"config error: {KEY} {shown!r}: {problems} for a {arch} network; {FIX}")
    return arch, config, found


def load(path, device=None, shown: str | None = None) -> nn.Module:
    """The feature network in ``path`` (local), frozen, in eval mode, on ``device``."""
    from safetensors.torch import load_file

    arch, config, _ = describe(path, shown)
    module = build(arch, config)
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.eval().requires_grad_(False).to(device or "cpu")


def mismatch(expected: dict, found: dict) -> str:
    """Names ``found`` lacks or adds, or shapes that differ, in a few words ("" when none)."""
    def shape(v):
        return tuple(getattr(v, "shape", v))

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and shape(found[k]) != shape(expected[k])]
    parts = [f"{len(keys)} {label} tensors (e.g. {keys[0]})"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return ", ".join(parts)
