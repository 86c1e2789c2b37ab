"""Shared fixtures: tiny random diffusers models saved with save_pretrained, and a real
S3 server (moto's server mode) on loopback. Tests under tests/unit are marked ``unit``,
tests under tests/integration ``integration``."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the local S3 server come from the environment, as users give them. Set
# before Ray starts so its workers inherit them; the secret is distinctive so tests can
# prove it never leaks into logs or outputs.
TEST_SECRET = "lsTestSecret-9f2c7e1d-do-not-log"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def pixel_model(models_dir) -> Path:
    """Unconditional UNet2DModel, DDPM scheduler (clip_sample on, final ᾱ = 1: last σ = 0)."""
    from tiny_models import save_pixel_model

    return save_pixel_model(models_dir / "pixel")


@pytest.fixture(scope="session")
def other_pixel_model(models_dir) -> Path:
    """A second, independently initialised pixel model (the translation target)."""
    from tiny_models import save_pixel_model

    return save_pixel_model(models_dir / "pixel-other", seed=1)


@pytest.fixture(scope="session")
def class_model(models_dir) -> Path:
    """Class-conditional UNet2DModel with 4 classes (class 3 is used as the null class)."""
    from tiny_models import save_pixel_model

    return save_pixel_model(models_dir / "class", num_class_embeds=4, seed=2)


@pytest.fixture(scope="session")
def sd_model(models_dir) -> Path:
    """Stable-Diffusion-shaped: UNet2DConditionModel + AutoencoderKL + CLIP text encoder."""
    from tiny_models import save_sd_model

    return save_sd_model(models_dir / "sd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server mode) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An s3fs handle on the local server (credentials come from the environment)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session (2 CPUs, like CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails, and fails the test even if the caller swallowed it
    (CLIP, LPIPS and model loading must never download at run time)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    assert not attempts, f"a test tried to use the network: {attempts}"
