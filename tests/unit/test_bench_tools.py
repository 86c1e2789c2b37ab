"""The bench's helpers: random-weight model folders, the NVML monitor and the CycleDiffusion peer."""

from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from pipeline.tools import random_models
from pipeline.tools.gpu_monitor import GpuMonitor, default_device_index

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return random_models.save_random_model(tmp_path_factory.mktemp("bench") / "tiny-sd", "tiny-sd")


# ---- random_models ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, conditioning, model_shape", [
    ("tiny-pixel", "none", (3, 32, 32)),
    ("tiny-sd", "text", (4, 8, 8)),
])
def test_tiny_folders_load_as_the_pipeline_loads_models(tmp_path, tiny_sd, shape, conditioning, model_shape):
    from pipeline.data.model_store import resolve_model
    from pipeline.diffusion import load_denoiser

    folder = tiny_sd if shape == "tiny-sd" else random_models.save_random_model(tmp_path / shape, shape)
    den = load_denoiser(resolve_model(str(folder)))
    n = random_models.image_size(shape)
    assert den.conditioning == conditioning and random_models.is_text_model(shape) == (conditioning == "text")
    assert den.model_space_shape((3, n, n)) == model_shape
    x0 = den.to_model_space(torch.rand(2, 3, n, n) * 2 - 1)
    eps = den.eps(x0, 500, ["a cat", "a dog"] if conditioning == "text" else None)
    assert x0.shape == eps.shape == (2, *model_shape) and torch.isfinite(eps).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = random_models.save_random_model(tmp_path / "a", "tiny-pixel", seed=3)
    b = random_models.save_random_model(tmp_path / "b", "tiny-pixel", seed=3, dtype=torch.float16)
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(wb[k].dtype == torch.float16 and torch.equal(wa[k].half(), wb[k]) for k in wa)


def test_real_shapes_have_the_published_parameter_counts():
    """Built on the meta device (no memory, about a second); the counts of the published checkpoints."""
    with torch.device("meta"):
        ddpm = random_models.build_modules("ddpm-256")
        sd = random_models.build_modules("sd-1")

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(ddpm["unet"]) == 113_673_219  # google/ddpm-ema-church-256
    assert count(sd["unet"]) == 859_520_964  # stable-diffusion-v1-5 unet
    assert count(sd["vae"]) == 83_653_863
    assert count(sd["text_encoder"]) == 123_060_480  # CLIP ViT-L/14 text tower
    cfg = random_models.model_configs("sd-1")
    assert cfg["unet"]["cross_attention_dim"] == 768 and cfg["unet"]["sample_size"] == 64
    assert cfg["tokenizer"]["model_max_length"] == cfg["text_encoder"]["max_position_embeddings"] == 77
    assert cfg["vae"]["scaling_factor"] == 0.18215 and cfg["scheduler"]["beta_schedule"] == "scaled_linear"
    assert random_models.model_configs("ddpm-256")["unet"]["sample_size"] == random_models.image_size("ddpm-256")
    assert random_models.image_size("sd-1") == 512 and not random_models.is_text_model("ddpm-256")


def test_unknown_shape_is_refused():
    with pytest.raises(ValueError, match="tiny-sd"):
        random_models.image_size("sd-2")


# ---- GpuMonitor --------------------------------------------------------------------------------


def test_monitor_without_nvidia_ml_py_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with GpuMonitor(interval_s=0.01) as mon:
        pass
    assert not mon.available and "not installed" in mon.reason
    assert mon.busy() is None and mon.peak_memory_mb() is None and mon.samples == []


def _fake_nvml(init_error=None, util=40):
    def init():
        if init_error:
            raise init_error

    return types.SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=util, memory=0),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**20, total=8 * 2**20, free=5 * 2**20),
    )


def test_monitor_without_driver_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(init_error=RuntimeError("NVML Shared Library Not Found")))
    with GpuMonitor(interval_s=0.01) as mon:
        pass
    assert not mon.available and "Library Not Found" in mon.reason and mon.busy() is None


def test_monitor_samples_in_the_background(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(util=40))
    with GpuMonitor(interval_s=0.005, device_index=0) as mon:
        time.sleep(0.05)
    n = len(mon.samples)
    time.sleep(0.02)
    assert mon.available and n >= 3 and len(mon.samples) == n  # stopped on exit
    assert mon.busy() == pytest.approx(0.4) and mon.peak_memory_mb() == pytest.approx(3.0)


def test_busy_averages_the_samples_in_the_window():
    mon = GpuMonitor()
    for t, util, mem in [(1.0, 0, 100), (2.0, 50, 300), (3.0, 100, 200), (4.0, 90, 2**20)]:
        mon._record(t, util, mem)
    assert mon.busy() == pytest.approx(0.6)
    assert mon.busy(2.0, 3.0) == pytest.approx(0.75)  # both ends included
    assert mon.busy(start=2.5) == pytest.approx(0.95) and mon.busy(end=1.5) == 0.0
    assert mon.busy(1.2, 1.8) is None  # no sample inside
    assert mon.peak_memory_mb() == 1.0 and mon.peak_memory_mb(1.0, 3.0) == pytest.approx(300 / 2**20)


def test_device_index_follows_cuda_visible_devices(monkeypatch):
    for value, index in [("3,1", 3), ("GPU-1b2c3d4e", 0), ("", 0)]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert default_device_index() == index
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert default_device_index() == 0 and GpuMonitor(device_index=2).device_index == 2


# ---- the CycleDiffusion peer -------------------------------------------------------------------


def _peer(folder, **overrides):
    from pipeline.tools.peer import cycle_diffusion_images_per_s

    kwargs = dict(source_prompt="a cat", target_prompt="a dog", steps=4, strength=0.5, eta=0.1,
                  guidance_scale=1.0, source_guidance_scale=1.0, batch_size=2, device="cpu")
    kwargs.update(overrides)
    return cycle_diffusion_images_per_s(folder, torch.rand(2, 3, 16, 16) * 2 - 1, **kwargs)


def test_peer_translates_a_batch(tiny_sd):
    out = _peer(tiny_sd)
    assert out["images_per_s"] > 0 and out["images"] == 2 and out["batch_size"] == 2
    assert out["all_finite"] and out["peak_gpu_memory_mb"] is None and out["seconds"] > 0


def test_peer_guides_one_image_per_call(tiny_sd):
    """CycleDiffusionPipeline's guided branch only handles one image per call (see pipeline.tools.peer)."""
    out = _peer(tiny_sd, guidance_scale=2.0, warmup=False)
    assert out["batch_size"] == 1 and out["requested_batch_size"] == 2 and out["all_finite"]


def test_peer_refuses_eta_zero(tiny_sd):
    with pytest.raises(ValueError, match="eta"):
        _peer(tiny_sd, eta=0.0)
