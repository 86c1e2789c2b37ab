"""Demo shape domains and the analytic shape metric."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import iter_tar_samples
from pipeline.demo.shapes import ALIGNED_SIDE, DOMAINS, render, write_shapes
from pipeline.metrics.shapes import FILL, hue_error, measure_shapes, shape_rate


@pytest.mark.parametrize("domain", DOMAINS)
def test_generator_follows_the_spec(domain):
    images, meta = render(domain, 500, seed=3)
    assert images.shape == (500, 32, 32, 3) and images.dtype == np.uint8
    for img, m in zip(images[:50], meta[:50], strict=True):
        x, y, s, _ = m["box"]
        assert 12 <= s <= 24 and 0 <= x <= 32 - s and 0 <= y <= 32 - s
        lit = img.max(2) > 0
        ys, xs = np.nonzero(lit)
        assert xs.min() >= x and xs.max() < x + s and ys.min() >= y and ys.max() < y + s  # inside its box
        assert 0 <= m["hue"] < 360 and 0.8 <= m["value"] <= 1.0
        assert (img[~lit] == 0).all()  # black background
    hues = np.array([m["hue"] for m in meta])
    assert hues.min() < 20 and hues.max() > 340  # spread over the circle


def test_generator_is_seeded_and_domains_differ():
    a, _ = render("discs", 10, seed=1)
    b, _ = render("discs", 10, seed=1)
    c, _ = render("discs", 10, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("domain", DOMAINS)
def test_metric_labels_generated_shapes(domain):
    images, meta = render(domain, 1000, seed=4)
    m = measure_shapes(images)
    assert (m["label"] == domain).mean() >= 0.99
    assert abs(np.median(m["fill"]) - FILL[domain]) < 0.05
    assert np.median(hue_error(m["hue"], [x["hue"] for x in meta])) < 1.0
    centre = np.array([[x + s / 2, y + s / 2] for x, y, s, _ in (q["box"] for q in meta)])
    if domain != "triangles":  # a triangle's centroid sits below its box centre
        assert np.abs(m["centroid"] - centre).max() < 0.75


def test_metric_on_blank_and_noise():
    blank = np.zeros((2, 32, 32, 3), np.uint8)
    assert list(measure_shapes(blank)["label"]) == ["none", "none"]
    assert shape_rate(blank, "discs") == 0.0


def test_write_shapes_as_shards(tmp_path):
    paths = write_shapes("triangles", 10, str(tmp_path), seed=0, per_shard=4)
    assert len(paths) == 3
    samples = [s for p in paths for s in iter_tar_samples(open(p, "rb"))]
    assert [s.key for s in samples] == [f"triangles-{i:06d}" for i in range(10)]
    meta = json.loads(samples[0].members["json"])
    assert meta["domain"] == "triangles" and len(meta["box"]) == 4
    img = np.asarray(Image.open(io.BytesIO(samples[0].members["png"])))
    assert measure_shapes(img[None])["label"][0] == "triangles"


@pytest.mark.parametrize("domain", DOMAINS)
def test_aligned_masks_are_identical_and_only_colour_varies(domain):
    images, meta = render(domain, 200, seed=5, aligned=True)
    masks = images.max(axis=3) > 0
    assert (masks == masks[0]).all()  # one mask for every sample
    margin = (32 - ALIGNED_SIDE) // 2
    assert all(m["box"] == [margin, margin, ALIGNED_SIDE, ALIGNED_SIDE] for m in meta)
    ys, xs = np.nonzero(masks[0])
    assert xs.min() >= margin and xs.max() < margin + ALIGNED_SIDE and ys.min() >= margin and ys.max() < margin + ALIGNED_SIDE
    colours = images[:, ys[0], xs[0]]  # every lit pixel of a sample has its one colour
    assert (images[masks] == np.repeat(colours, masks[0].sum(), axis=0)).all()
    assert len(np.unique(colours, axis=0)) > 150  # and the colour varies
    unaligned, unaligned_meta = render(domain, 200, seed=5)
    assert [m["hue"] for m in meta] == [m["hue"] for m in unaligned_meta]  # the same colour draws
    assert not (unaligned.max(axis=3) > 0).all(axis=0).all()


def test_metric_labels_aligned_triangles_as_triangles():
    images, meta = render("triangles", 500, seed=6, aligned=True)
    m = measure_shapes(images)
    assert (m["label"] == "triangles").all()
    assert np.median(hue_error(m["hue"], [x["hue"] for x in meta])) < 1.0


def test_unaligned_default_is_unchanged():
    a, meta = render("triangles", 50, seed=1)
    b, _ = render("triangles", 50, seed=1, aligned=False)
    assert np.array_equal(a, b) and len({tuple(m["box"]) for m in meta}) > 1


def test_write_aligned_shards(tmp_path):
    paths = write_shapes("triangles", 3, str(tmp_path), seed=0, aligned=True)
    samples = [s for p in paths for s in iter_tar_samples(open(p, "rb"))]
    masks = [np.asarray(Image.open(io.BytesIO(s.members["png"]))).max(axis=2) > 0 for s in samples]
    assert all((m == masks[0]).all() for m in masks)
