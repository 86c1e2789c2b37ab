"""A reduced demo end to end (few images, few steps) on briefly trained stand-in models."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from pipeline.demo.run import MAIN_DOMAIN, OOD_DOMAINS, SAMPLING_MODES, format_table, run_demo
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


def check_unseen(u: dict, images: int, inputs: int, domains=tuple(OOD_DOMAINS)) -> None:
    """Part 3's report: every domain row, each with its fit, gate, novelty scale and every mode."""
    assert list(u["domains"]) == list(domains) and u["main_domain"] == MAIN_DOMAIN
    assert 0 <= u["plain_discs_model"]["triangle_rate"] <= 1 and u["plain_discs_model"]["count"] == images
    for name, d in u["domains"].items():
        assert d["role"] == ("main" if name == MAIN_DOMAIN else "limit") and d["inputs"] == inputs
        gate = d["gate"]
        assert gate["images"] == inputs and 0 <= gate["triangle_rate"] <= 1 and gate["target"] == 0.95
        assert gate["passed"] == (gate["triangle_rate"] >= 0.95) and gate["t0"] == d["fits"][d["fit"]]["t0"]
        assert gate["passed"] or "too weak" in gate["verdict"] and gate["model"] in gate["verdict"]
        own = d["inputs_nearest_neighbour_distance"]
        assert own["count"] == inputs and 0 <= own["q10"] <= own["q50"] <= own["q90"]
        assert d["novelty_threshold"] == pytest.approx(0.5 * own["q50"])
        assert [m for m, _ in SAMPLING_MODES] == list(d["modes"])
        for m in d["modes"].values():
            assert m["count"] == images and m["nearest_input_distance"]["count"] == images
            for rate in ("triangle_rate", "novel_rate", "novel_triangle_rate", "acceptance_rate"):
                assert 0 <= m[rate] <= 1, rate
            assert m["novel_triangle_rate"] <= min(m["triangle_rate"], m["novel_rate"])
            assert m["nearest_input_distance"]["q50"] >= 0 and isinstance(m["near_copies"], bool)
        assert d["best_novel_triangle_rate"] == max(m["novel_triangle_rate"] for m in d["modes"].values())
    geometric = u["domains"][MAIN_DOMAIN]["modes"]["gaussian + geometric selection"]
    assert 0 < geometric["acceptance_rate"] <= 1


def test_reduced_demo_end_to_end(ray_cluster, tmp_path, stand_in_models):
    report = run_demo(tmp_path / "demo", discs=8, triangles=8, unseen=4, steps=4, models=stand_in_models)
    assert report["translation"]["images"] == 8 and report["translation"]["pairs"] == 8
    for key in ("target_shape_rate", "median_hue_error_deg", "median_centroid_shift_px"):
        assert key in report["translation"]
    check_unseen(report["unseen"], images=4, inputs=8)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["unseen"]["domains"].keys() == report["unseen"]["domains"].keys()
    sheet = Image.open(io.BytesIO((tmp_path / "demo" / "report.png").read_bytes()))
    rows = 3 + len(OOD_DOMAINS) * (1 + len(SAMPLING_MODES))  # discs, translated, plain; per domain inputs + modes
    assert sheet.size[0] > 16 * 96 and sheet.size[1] > rows * 96
    table = format_table(report)
    assert "target-shape rate" in table and "invert→decode gate" in table and "(target ≥ 50%)" in table
    assert all(mode in table for mode, _ in SAMPLING_MODES)
    assert (tmp_path / "demo" / "inputs" / "discs").is_dir() and (tmp_path / "demo" / "translated" / "images").is_dir()
    for domain in OOD_DOMAINS:
        assert (tmp_path / "demo" / "unseen" / domain / "fit" / "stats" / "ood.safetensors").is_file()


def test_reduced_demo_on_object_storage(ray_cluster, tmp_path, stand_in_models, s3, s3_server):
    """`latentshift demo --s3`: the same run with every input and output on a real (local) S3 server.

    The main OOD row only: the other row runs the same code on other inputs, and each row costs
    CI three more jobs.
    """
    s3.mkdir("latentshift-demo")
    report = run_demo(tmp_path / "demo", discs=8, triangles=8, unseen=4, steps=4, models=stand_in_models,
                      s3_endpoint=s3_server, domains=[MAIN_DOMAIN])
    assert report["translation"]["images"] == 8
    check_unseen(report["unseen"], images=4, inputs=8, domains=[MAIN_DOMAIN])
    s3.invalidate_cache()
    assert len(s3.glob("latentshift-demo/translated/images/*.tar")) == 1
    for domain in [MAIN_DOMAIN]:
        assert s3.glob(f"latentshift-demo/inputs/triangles-{domain}/*.tar")
        assert len(s3.glob(f"latentshift-demo/unseen/{domain}/*/images/*.tar")) == len(SAMPLING_MODES)
    assert (tmp_path / "demo" / "report.png").is_file()  # the report stays local
