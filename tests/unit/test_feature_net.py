"""The FID feature network (pipeline/metrics/feature_net.py) and its export (pipeline/tools/fid_export.py),
against the peers: pytorch-fid's FID Inception (the pytorch_fid package, its own blocks, random weights
since nothing may be downloaded here) and clean-fid's InceptionV3W wrapper around a TorchScript file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.metrics import feature_net
from pipeline.metrics.feature_net import INCEPTION, TINY, FIDInception
from pipeline.metrics.fid import DeviceResize, clean_resize, pil_bicubic_weights
from pipeline.tools import fid_export

pytestmark = pytest.mark.unit


def random_state(shapes: dict, seed: int = 0) -> dict:
    """A tensor per name of ``shapes`` (name → tensor or shape): random, BN variances positive, BN scales 1,
    convolutions He-scaled so that activations stay of order 1 through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in shapes.items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=torch.long)
        elif k.endswith(("running_var", ".var")):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            state[k] = torch.ones(shape)
        elif len(shape) == 4:
            state[k] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def pytorch_fid_pair(monkeypatch_module):
    """pytorch-fid's FID InceptionV3 with random weights (its weight download answered locally), and ours
    with the same weights renamed by ``from_pytorch_fid``."""
    import pytorch_fid.inception as pf

    with torch.device("meta"):
        shapes = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    state = random_state(shapes, 0)
    monkeypatch_module.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=False, normalize_input=False).eval()
    ours = FIDInception()
    ours.load_state_dict(fid_export.from_pytorch_fid(state), strict=True)
    return theirs, ours.eval(), state


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@torch.no_grad()
def test_inception_is_pytorch_fids_network(pytorch_fid_pair):
    """Same weights, same input → the same 2048 features: our layout (the TorchScript's names) is the TF graph
    pytorch-fid rebuilds (FIDInceptionA/C/E_1/E_2: pools without padding counted, E_2's max pool)."""
    theirs, ours, _ = pytorch_fid_pair
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 255
    a = ours(x)
    y = feature_net.normalise(x)
    for block in theirs.blocks:  # pytorch-fid's forward past its own [0, 1] → [−1, 1] step, on our normalisation
        y = block(y)
    b = y.reshape(2, -1)
    assert a.shape == (2, 2048)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert float(a.std()) > 0  # not a degenerate network


def test_every_pytorch_fid_tensor_is_placed_once(pytorch_fid_pair):
    _, ours, state = pytorch_fid_pair
    mapped = fid_export.from_pytorch_fid(state)
    assert set(mapped) == set(ours.state_dict())
    used = [k for k in state if fid_export.pytorch_fid_name(k)]
    assert len(used) == len(mapped)  # no two source tensors land on one name
    assert all(k.startswith(("fc.",)) or k.endswith(("bn.weight", "num_batches_tracked")) for k in state if k not in used)


def test_pytorch_fid_scales_other_than_one_are_refused(pytorch_fid_pair):
    _, _, state = pytorch_fid_pair
    bad = dict(state)
    bad["Conv2d_1a_3x3.bn.weight"] = torch.full_like(bad["Conv2d_1a_3x3.bn.weight"], 2.0)
    with pytest.raises(ConfigError, match="batch-norm scale other than 1"):
        fid_export.from_pytorch_fid(bad)


def test_export_from_pytorch_fid_file_loads_to_the_same_features(pytorch_fid_pair, tmp_path):
    theirs, ours, state = pytorch_fid_pair
    src = tmp_path / "pt_inception.pth"
    torch.save(state, src)
    info = fid_export.export(tmp_path / "inception.safetensors", source="pytorch-fid", file=src)
    assert info["source"] == "pytorch-fid" and len(info["source_sha256"]) == 64
    loaded = feature_net.load(tmp_path / "inception.safetensors")
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


class Holder(torch.nn.Module):
    """The NVlabs file's shape: a module whose ``layers`` clean-fid calls."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


def test_export_from_a_torchscript_checks_it_against_clean_fids_wrapper(tmp_path):
    """A TorchScript with a ``layers`` module, as clean-fid's InceptionV3W uses it: the export takes its
    tensors by name, probes the two networks, and the file gives clean-fid's own wrapper's features."""
    from cleanfid.inception_torchscript import InceptionV3W

    net = FIDInception()
    net.load_state_dict(random_state(net.state_dict(), 3))
    scripted = torch.jit.trace(Holder(net.eval().layers), torch.rand(1, 3, 299, 299) * 2 - 1)
    (tmp_path / "ts").mkdir()
    scripted.save(str(tmp_path / "ts" / "inception-2015-12-05.pt"))
    info = fid_export.export(tmp_path / "i.safetensors", source="clean-fid", file=tmp_path / "ts" / "inception-2015-12-05.pt")
    assert info["probe_difference"] < 1e-6
    wrapper = InceptionV3W(str(tmp_path / "ts"), download=False)  # clean-fid: (x − 128) / 128, then layers
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        assert torch.allclose(feature_net.load(tmp_path / "i.safetensors")(x), wrapper(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_file_that_is_not_the_network(tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, src)
    with pytest.raises(ConfigError, match="missing tensors"):
        fid_export.export(tmp_path / "x.safetensors", source="pytorch-fid", file=src)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ConfigError, match="already exists"):
        fid_export.export(src, source="pytorch-fid", file=src)


def test_loading_never_unpickles(tmp_path):
    """Only safetensors: a pickle named .safetensors is refused in one line (its payload never runs)."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    bad = tmp_path / "net.safetensors"
    bad.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        feature_net.load(bad)


def test_file_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.inception .*no such file.*fid-export"):
        feature_net.describe(tmp_path / "missing.safetensors")
    path = feature_net.random_tiny(tmp_path / "tiny.safetensors", widths=(4, 8))
    arch, config, shapes = feature_net.describe(path)
    assert arch == TINY and config == {"widths": [4, 8]} and shapes["layers.conv1.weight"] == (8, 4, 3, 3)
    from safetensors.torch import save_file

    save_file({"layers.conv.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "part.safetensors"),
              metadata={feature_net.META_ARCH: INCEPTION})
    with pytest.raises(ConfigError, match="missing tensors"):
        feature_net.describe(tmp_path / "part.safetensors")


def test_tiny_network_is_deterministic_and_takes_clean_fid_input(tmp_path):
    a = feature_net.load(feature_net.random_tiny(tmp_path / "a.safetensors", seed=5))
    b = feature_net.load(feature_net.random_tiny(tmp_path / "b.safetensors", seed=5))
    x = torch.rand(3, 3, 299, 299) * 255
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert fa.shape == (3, 16) and torch.equal(fa, fb)


# ---- the device resize -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (256, 256), (512, 384), (17, 33), (299, 299), (600, 1000)])
def test_device_resize_is_clean_fids_resize(shape):
    """uint8 on the device, two matrix products → clean-fid's resizer (PIL float bicubic) to float32 rounding."""
    from cleanfid.resize import build_resizer

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    theirs = build_resizer("clean")(image)
    ours = DeviceResize()(torch.from_numpy(image)[None])[0].permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape == (299, 299, 3)
    assert np.abs(ours - theirs).max() < 2e-4  # 255 · float32 ε, a few roundings
    assert np.array_equal(clean_resize(image), theirs)


def test_pil_weights_rows_sum_to_one_and_widen_when_shrinking():
    up, down = pil_bicubic_weights(64, 299), pil_bicubic_weights(1000, 299)
    assert np.allclose(up.sum(1), 1) and np.allclose(down.sum(1), 1)
    assert (up[150] != 0).sum() == 4  # the cubic's 4 taps when enlarging
    assert (down[150] != 0).sum() > 4 * (1000 / 299) - 2  # antialiased: the support grows with the scale


def test_the_demos_edge_network_tells_squares_from_discs(tmp_path):
    """The demo's stand-in (fixed Sobel filters, pipeline/demo/translation.py): two sets of squares are
    closer to each other than to discs of the same colours, boxes and sizes, by FID and by KID."""
    from pipeline.demo.shapes import render
    from pipeline.demo.translation import edge_network
    from pipeline.metrics.fid import frechet_distance, gaussian_statistics, kernel_distance

    net = feature_net.load(edge_network(tmp_path / "edges.safetensors"))
    resize = DeviceResize()

    def features(domain, seed):
        images, _ = render(domain, 48, seed=seed)
        with torch.no_grad():
            return net(resize(torch.from_numpy(images))).numpy().astype(np.float64)

    squares, other_squares, discs = features("squares", 1), features("squares", 2), features("discs", 1)
    fid = {name: frechet_distance(*gaussian_statistics(squares), *gaussian_statistics(f))
           for name, f in (("squares", other_squares), ("discs", discs))}
    assert fid["squares"] * 3 < fid["discs"]
    kid = {name: kernel_distance(squares, f, rng=np.random.RandomState(0))
           for name, f in (("squares", other_squares), ("discs", discs))}
    assert kid["squares"] < kid["discs"]


def test_fid_bench_prints_its_figures():
    import io

    from pipeline.tools.fid_bench import run_fid_bench

    out = io.StringIO()
    r = run_fid_bench(images=2, batch_size=2, size=32, out=out)
    assert r["images"] == 2 and r["images_per_second"] > 0 and 0 < r["resize_share"] < 1
    assert "s per 1000 images" in out.getvalue()
