"""The demo's unseen-synthesis part without Ray: modes and fits, the gate, per-mode figures."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.demo import unseen as demo
from pipeline.demo.common import demo_config_dir
from pipeline.demo.shapes import render


def fake_run_job(calls):
    def run_job(cfg, name, overwrite=False, out=None):
        calls.append((name, cfg.output.uri, cfg.ood.stats, cfg.ood.geometric, cfg.ood.variance))
        if name == "ood-fit":
            return {"stats": f"{cfg.output.uri}/stats/ood.safetensors", "t0": cfg.ood.t0, "count": 8}
        return {"acceptance_rate": 1.0, "images": cfg.ood.count}
    return run_job


def test_modes_share_the_domain_fit_unless_they_change_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("pipeline.jobs.run_job", fake_run_job(calls))
    monkeypatch.setattr(demo, "SAMPLING_MODES", [("gaussian + geometric selection", ["ood.geometric=true"]),
                                                 ("gaussian only", ["ood.geometric=false"]),
                                                 ("diagonal", ["ood.variance=diagonal"])])
    jobs = demo.synthesize("aligned", str(tmp_path), demo_config_dir(), ["ood.count=4"], out=None)
    fits = [c for c in calls if c[0] == "ood-fit"]
    assert [c[1] for c in fits][0] == f"{tmp_path}/unseen/aligned/fit"
    assert len(fits) == 2 and fits[1][1].startswith(f"{tmp_path}/unseen/aligned/fit-") and fits[1][4] == "diagonal"
    samples = {c[1].rsplit("/", 1)[1]: c for c in calls if c[0] == "ood-sample"}
    assert set(samples) == {"gaussian-geometric-selection", "gaussian-only", "diagonal"}
    assert samples["gaussian-geometric-selection"][3] and not samples["gaussian-only"][3]
    assert samples["gaussian-only"][2] == fits[0][1] + "/stats/ood.safetensors"  # the shared fit
    assert samples["diagonal"][2] == fits[1][1] + "/stats/ood.safetensors"  # its own
    assert list(jobs["modes"]) == [name for name, _ in demo.SAMPLING_MODES]
    assert jobs["modes"]["diagonal"]["fit"] != jobs["main_fit"] == jobs["modes"]["gaussian only"]["fit"]


def test_copies_of_the_inputs_are_reported_as_copies_not_synthesis():
    inputs, _ = render("triangles", 16, seed=1, aligned=True)
    m = demo.mode_metrics(inputs[::-1].copy(), inputs)  # a "mode" that returns its references
    assert m["triangle_rate"] == 1.0 and m["novel_rate"] == 0.0 and m["novel_triangle_rate"] == 0.0
    assert m["near_copies"] and m["nearest_input_distance"]["max"] == 0.0


def test_novel_triangles_count_only_far_triangles():
    inputs, _ = render("triangles", 16, seed=1, aligned=True)
    discs, _ = render("discs", 4, seed=2)
    others, _ = render("triangles", 4, seed=3)  # unaligned: far from every aligned input
    m = demo.mode_metrics(np.concatenate([inputs[:4], others, discs]), inputs)
    assert m["triangle_rate"] == pytest.approx(8 / 12) and m["novel_triangle_rate"] == pytest.approx(4 / 12)
    assert not m["near_copies"] and m["labels"]["discs"] == 4


def test_hue_concentration():
    one_hue = np.zeros((3, 8, 8, 3), np.uint8)
    one_hue[:, 2:6, 2:6, 0] = 200  # red squares
    assert demo.hue_concentration(one_hue) == pytest.approx(1.0)
    spread, _ = render("discs", 400, seed=0)
    assert demo.hue_concentration(spread) < 0.15
    assert demo.hue_concentration(np.zeros((2, 8, 8, 3), np.uint8)) is None


def gate_config(**ood):
    overrides = [f"ood.{k}={v}" for k, v in {"inversion_steps": 10, **ood}.items()]
    return load_config(demo_config_dir() / "unseen.yaml", overrides)


def test_gate_passes_a_domain_the_model_reconstructs():
    triangles, _ = render("triangles", 4, seed=1, aligned=True)
    gate = demo.reconstruction_gate(gate_config(), triangles)
    assert gate["passed"] and gate["verdict"] == "pass" and gate["triangle_rate"] == 1.0
    assert gate["t0"] == 500 and gate["clip_x0"] == "off" and gate["images"] == 4


def test_gate_names_a_model_too_weak_for_the_domain():
    """Discs fed as the OOD domain: the discs model reconstructs them as discs, 0% triangles."""
    discs, _ = render("discs", 4, seed=1)
    gate = demo.reconstruction_gate(gate_config(), discs)
    assert not gate["passed"] and gate["triangle_rate"] == 0.0
    assert "bundled:discs is too weak for this domain" in gate["verdict"]


def test_slug():
    assert demo.slug("gaussian + geometric selection") == "gaussian-geometric-selection"
    assert demo.slug("slerp k=1") == "slerp-k-1"
