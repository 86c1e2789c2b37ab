"""A reduced demo end to end (few images, few steps) on briefly trained stand-in models."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline.demo.run import format_table, run_demo
from pipeline.demo.train import TrainConfig, train


@pytest.fixture(scope="module")
def stand_in_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-models")
    out = {}
    for domain in ("discs", "squares"):
        train(TrainConfig(domain=domain, out=str(root / domain), steps=2, batch=4, channels=(8, 16, 16)),
              progress=False)
        out[domain] = str(root / domain)
    return out


def test_reduced_demo_end_to_end(ray_cluster, tmp_path, stand_in_models):
    report = run_demo(tmp_path / "demo", discs=8, triangles=8, unseen=4, steps=4, models=stand_in_models)
    assert report["translation"]["images"] == 8 and report["translation"]["pairs"] == 8
    for key in ("target_shape_rate", "median_hue_error_deg", "median_centroid_shift_px"):
        assert key in report["translation"]
    u = report["unseen"]
    assert u["count"] == 4 and 0 < u["acceptance_rate"] <= 1 and report["gaussian_only_images"] == 4
    assert 0 <= u["triangle_rate_plain_discs_model"] <= 1
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["unseen"]["count"] == 4
    sheet = Image.open(io.BytesIO((tmp_path / "demo" / "report.png").read_bytes()))
    assert sheet.size[0] > 16 * 96 and sheet.size[1] > 6 * 96  # six rows of 16 tiles
    assert "target-shape rate" in format_table(report)
    assert (tmp_path / "demo" / "inputs" / "discs").is_dir() and (tmp_path / "demo" / "translated" / "images").is_dir()


def test_reduced_demo_on_object_storage(ray_cluster, tmp_path, stand_in_models, s3, s3_server):
    """`latentshift demo --s3`: the same run with every input and output on a real (local) S3 server."""
    s3.mkdir("latentshift-demo")
    report = run_demo(tmp_path / "demo", discs=8, triangles=8, unseen=4, steps=4, models=stand_in_models,
                      s3_endpoint=s3_server)
    assert report["translation"]["images"] == 8 and report["unseen"]["count"] == 4
    s3.invalidate_cache()
    assert len(s3.glob("latentshift-demo/translated/images/*.tar")) == 1
    assert s3.glob("latentshift-demo/unseen/images/*.tar") and s3.glob("latentshift-demo/inputs/triangles/*.tar")
    assert (tmp_path / "demo" / "report.png").is_file()  # the report stays local
