"""A model that cannot load fails the run once, in one line: in preflight (missing, pickle-only,
corrupt or truncated weights) before Ray or any staging, or (weights that do not fit the model's
config) on the first actor, with the run's staging removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_builders import good_samples

from pipeline.config import validate
from pipeline.errors import LatentshiftError, ModelLoadError
from pipeline.jobs import run_job


def inputs(tmp_path: Path) -> Path:
    from pipeline.data.shards import write_samples

    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "shard-000.tar", "wb") as f:
        write_samples(f, good_samples(5, 3))
    return tmp_path / "in"


def config(tmp_path: Path, source, target) -> dict:
    return {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
            "source": {"model": str(source)}, "target": {"model": str(target)},
            "sampler": {"steps": 4, "eta": 0.3, "strength": 0.5}, "image": {"size": 16},
            "runtime": {"batch_size": 4, "actors": 1}}


def no_staging(tmp_path: Path) -> bool:
    staging = tmp_path / "out" / "_staging"
    return not staging.exists() or not any(staging.iterdir())


def copy_model(pixel_model: Path, dest: Path) -> Path:
    shutil.copytree(pixel_model, dest)
    return dest


def test_missing_model_fails_in_preflight_without_ray(tmp_path, pixel_model):
    inputs(tmp_path)
    missing = tmp_path / "no-such-model"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config(tmp_path, pixel_model, missing)))
    # a fresh interpreter: Ray is not started for a model that does not exist
    script = (
        "import json, sys, ray\n"
        "from pipeline.config import validate\n"
        "from pipeline.errors import ModelLoadError\n"
        "from pipeline.jobs import run_job\n"
        f"cfg = validate(json.load(open({str(cfg_path)!r})))\n"
        "try:\n"
        "    run_job(cfg, 'translate')\n"
        "except ModelLoadError as exc:\n"
        "    print('ERROR', exc)\n"
        "print('RAY', ray.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, RAY_ADDRESS=""))
    assert proc.returncode == 0, proc.stderr
    assert f"ERROR model {str(missing)!r}: no such folder" in proc.stdout
    assert "RAY False" in proc.stdout
    assert no_staging(tmp_path)
    # in this process too: nothing but the probe written, Ray left as it was
    import ray

    before = ray.is_initialized()
    with pytest.raises(ModelLoadError, match=r"no such folder") as err:
        run_job(validate(config(tmp_path, missing, pixel_model)), "translate")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    assert ray.is_initialized() == before
    assert no_staging(tmp_path)
    assert not (tmp_path / "out" / "images").exists()
    for job in ("encode", "ood-fit"):
        with pytest.raises(ModelLoadError, match=r"no such folder"):
            run_job(validate(config(tmp_path, missing, pixel_model)), job)


def test_pickle_only_model_fails_in_preflight(tmp_path, pixel_model):
    import ray

    inputs(tmp_path)
    model = copy_model(pixel_model, tmp_path / "pickled")
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")  # never unpickled
    before = ray.is_initialized()
    with pytest.raises(ModelLoadError, match=r"allow_pickle") as err:
        run_job(validate(config(tmp_path, pixel_model, model)), "translate")
    assert str(model) in str(err.value) and "\n" not in str(err.value)
    assert ray.is_initialized() == before
    assert no_staging(tmp_path)


def test_corrupt_or_truncated_weights_fail_in_preflight(tmp_path, pixel_model):
    import ray

    inputs(tmp_path)
    before = ray.is_initialized()
    corrupt = copy_model(pixel_model, tmp_path / "corrupt")
    for f in (corrupt / "unet").glob("*.safetensors"):
        f.write_bytes(b"\x00garbage, not safetensors\xff" * 64)
    truncated = copy_model(pixel_model, tmp_path / "truncated")
    for f in (truncated / "unet").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:-1000])  # a download cut short
    for model in (corrupt, truncated):
        with pytest.raises(ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors is not a valid "
                                                 r"safetensors file \(.+\); download or export it again") as err:
            run_job(validate(config(tmp_path, pixel_model, model)), "translate")
        assert str(model) in str(err.value) and "\n" not in str(err.value)
    assert ray.is_initialized() == before
    assert no_staging(tmp_path)


def mismatched_model(pixel_model: Path, dest: Path) -> Path:
    """Valid safetensors whose tensors do not fit the unet's config: the preflight's meta-device
    build finds out (check_weights_fit), or else loading them on an actor."""
    model = copy_model(pixel_model, dest)
    cfg = json.loads((model / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    (model / "unet" / "config.json").write_text(json.dumps(cfg))
    return model


def test_weights_that_do_not_fit_fail_the_run_once_in_one_line(ray_cluster, tmp_path, pixel_model, monkeypatch):
    """The actor path: a model that passes the preflight and still fails on the actor (here the
    preflight's shape check is switched off) fails the run once, in one line."""
    import pipeline.diffusion.denoiser

    monkeypatch.setattr(pipeline.diffusion.denoiser, "check_weights_fit", lambda folder, **kw: None)
    inputs(tmp_path)
    model = mismatched_model(pixel_model, tmp_path / "mismatched")
    started = time.time()
    with pytest.raises(LatentshiftError) as err:
        run_job(validate(config(tmp_path, pixel_model, model)), "translate")
    assert time.time() - started < 90
    message = str(err.value)
    assert str(model) in message and "\n" not in message, message
    assert isinstance(err.value, ModelLoadError)
    assert no_staging(tmp_path)
    assert not list((tmp_path / "out" / "_ledger").glob("shard-*.json"))


def test_weights_that_do_not_fit_cli_exits_2_with_a_short_stderr(ray_cluster, tmp_path, pixel_model):
    import ray

    inputs(tmp_path)
    model = mismatched_model(pixel_model, tmp_path / "mismatched")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(json.dumps(config(tmp_path, model, pixel_model)))  # JSON is YAML
    exe = Path(sys.executable).parent / "latentshift"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.run([str(exe), "translate", "-c", str(cfg_path)], capture_output=True, text=True, timeout=110,
                          env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("latentshift: model "), lines[-1]
    assert str(model) in lines[-1] and "conv_in" in lines[-1] and "do not fit" in lines[-1]
    # found by the preflight (meta-device build vs safetensors headers): no Ray output at all
    assert len(lines) <= 3, f"{len(lines)} lines of stderr:\n" + proc.stderr
    assert "infinite retries" not in proc.stderr
    assert no_staging(tmp_path)


def test_an_error_a_user_can_act_on_comes_back_from_an_actor_as_one_line(ray_cluster, tmp_path, pixel_model):
    """A DeviceMemoryError raised in a Ray actor's batch (ModelStage.fitting: one sample does not fit)
    reaches the driver wrapped in Ray's RayTaskError, its text prefixed by the actor; the run's error is
    the original type with its one-line message, as the CLI prints it."""
    import ray

    from pipeline.errors import DeviceMemoryError
    from pipeline.jobs import get
    from pipeline.runtime.models import actor_failure

    @ray.remote
    class Stage:
        def __call__(self):
            raise DeviceMemoryError("one sample of TranslateStage does not fit in GPU memory even alone: lower\n"
                                    "image.size (CUDA out of memory)")

    with pytest.raises(Exception) as caught:  # noqa: PT011 - Ray's wrapper type is what is being unwrapped
        ray.get(Stage.remote().__call__.remote())
    assert "ray::Stage" in str(caught.value) and len(str(caught.value).splitlines()) > 1  # Ray's text, not one line
    cfg = validate(config(tmp_path, pixel_model, pixel_model))
    failure = actor_failure(caught.value, get("translate"), cfg)
    assert type(failure) is DeviceMemoryError
    assert str(failure) == ("one sample of TranslateStage does not fit in GPU memory even alone: lower image.size "
                            "(CUDA out of memory)")
    assert actor_failure(RuntimeError("something else"), get("translate"), cfg) is None
