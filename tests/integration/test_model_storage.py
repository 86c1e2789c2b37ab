"""Models in object storage: resolve_model (copy, cache, checks) against a real S3 API (moto server)
on loopback, then load_denoiser on the local copy."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from pipeline.data.model_cache import COMPLETE_MARKER, materialize
from pipeline.data.model_store import resolve_model
from pipeline.diffusion import load_denoiser
from pipeline.errors import ModelLoadError, StorageError


@pytest.fixture
def bucket(s3):
    name = f"models-{threading.get_ident() % 100000}"
    if not s3.exists(name):
        s3.mkdir(name)
    return name


def test_load_from_s3_folder_equals_local(s3, s3_server, bucket, pixel_model, tmp_path):
    s3.put(str(pixel_model), f"{bucket}/ddpm-pixel", recursive=True)
    uri, opts = f"s3://{bucket}/ddpm-pixel", {"endpoint_url": s3_server}
    resolved = resolve_model(uri, opts, cache_dir=tmp_path)
    assert resolved.source == uri and resolved.path.parent == tmp_path and (resolved.path / COMPLETE_MARKER).exists()
    assert resolved.components == ("unet", "scheduler")
    den = load_denoiser(resolved)
    local = load_denoiser(str(pixel_model))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(den.eps(x, 100), local.eps(x, 100), atol=1e-6)
    assert den.source == uri
    # resolving again reuses the cached copy: same folder, still one copy
    assert resolve_model(uri, opts, cache_dir=tmp_path).path == resolved.path
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1


def test_cache_is_keyed_by_object_version_and_shared_by_processes(s3, s3_server, bucket, pixel_model, tmp_path):
    uri = f"s3://{bucket}/versioned"
    s3.put(str(pixel_model), f"{bucket}/versioned", recursive=True)
    opts = {"endpoint_url": s3_server}
    # several actors (processes) starting at once must end up sharing one complete copy
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(materialize, [(uri, opts, tmp_path)] * 3)
    assert len(set(results)) == 1 and (results[0] / COMPLETE_MARKER).exists()
    assert (results[0] / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # one copy, no leftovers

    s3.pipe(f"{bucket}/versioned/scheduler/scheduler_config.json",
            (pixel_model / "scheduler" / "scheduler_config.json").read_bytes().replace(b'"linear"', b'"scaled_linear"'))
    changed = materialize(uri, opts, tmp_path)
    assert changed != results[0]
    assert b"scaled_linear" in (changed / "scheduler" / "scheduler_config.json").read_bytes()


def test_pickle_only_weights_in_s3_are_refused(s3, s3_server, bucket, pixel_model, tmp_path):
    from safetensors.torch import load_file

    prefix = f"{bucket}/pickled"
    for sub in ("scheduler", "unet"):
        for f in (pixel_model / sub).iterdir():
            if f.suffix != ".safetensors":
                s3.pipe(f"{prefix}/{sub}/{f.name}", f.read_bytes())
    local_bin = tmp_path / "w.bin"
    torch.save(load_file(pixel_model / "unet" / "diffusion_pytorch_model.safetensors"), local_bin)
    s3.put(str(local_bin), f"{prefix}/unet/diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"'s3://.*/pickled'.*pickle-based weights.*allow_pickle: true"):
        resolve_model(f"s3://{prefix}", {"endpoint_url": s3_server}, cache_dir=tmp_path / "c")
    resolved = resolve_model(f"s3://{prefix}", {"endpoint_url": s3_server}, allow_pickle=True, cache_dir=tmp_path / "c")
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(load_denoiser(resolved).eps(x, 5), load_denoiser(str(pixel_model)).eps(x, 5), atol=1e-5)


def test_missing_prefix_and_bucket_are_clear_errors(s3, s3_server, bucket, tmp_path):
    opts = {"endpoint_url": s3_server}
    with pytest.raises(ModelLoadError, match=r"no files under this prefix"):
        resolve_model(f"s3://{bucket}/nothing-here", opts, cache_dir=tmp_path)
    with pytest.raises((StorageError, ModelLoadError), match=r"s3://no-such-bucket-x/m"):
        resolve_model("s3://no-such-bucket-x/m", opts, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match=r"resolve_model"):  # load_denoiser never reaches storage itself
        load_denoiser(f"s3://{bucket}/nothing-here")


def test_missing_credentials_name_the_fix(s3_server, monkeypatch, tmp_path):
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match=r"s3://models/m: no credentials found: set AWS_ACCESS_KEY_ID"):
        resolve_model("s3://models/m", {"endpoint_url": s3_server}, cache_dir=tmp_path)
