"""pipeline/metrics/fid.py against clean-fid's own code (GaParmar/clean-fid e88c4d6), written out here
line for line as the peer: the clean resize (cleanfid/resize.py:41-57), frechet_distance
(cleanfid/fid.py:37-87) and kernel_distance (cleanfid/fid.py:93-110); and against the definitions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from pipeline.metrics.fid import (
    clean_resize,
    frechet_distance,
    gaussian_statistics,
    kernel_distance,
    kid_subsets,
)

pytestmark = pytest.mark.unit


def peer_resize(x):  # cleanfid/resize.py:49-57 with output_size (299, 299), filter bicubic
    def resize_single_channel(x_np):
        img = Image.fromarray(x_np.astype(np.float32), mode="F")
        img = img.resize((299, 299), resample=Image.BICUBIC)
        return np.asarray(img).clip(0, 255).reshape(299, 299, 1)
    return np.concatenate([resize_single_channel(x[:, :, idx]) for idx in range(3)], axis=2).astype(np.float32)


def peer_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):  # cleanfid/fid.py:53-87
    diff = mu1 - mu2
    with warnings.catch_warnings():  # clean-fid's disp=False, deprecated in SciPy 1.17
        warnings.simplefilter("ignore", DeprecationWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2), disp=False)[0]
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def peer_kid(feats1, feats2, num_subsets=100, max_subset_size=1000):  # cleanfid/fid.py:99-110
    n = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), max_subset_size)
    t = 0
    for _ in range(num_subsets):
        x = feats2[np.random.choice(feats2.shape[0], m, replace=False)]
        y = feats1[np.random.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


@pytest.mark.parametrize("shape", [(64, 48, 3), (300, 311, 3), (17, 17, 3)])
def test_clean_resize_is_clean_fids(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got = clean_resize(image)
    assert got.dtype == np.float32 and got.shape == (299, 299, 3)
    np.testing.assert_allclose(got, peer_resize(image), rtol=0, atol=1e-5)
    assert not np.allclose(got, np.round(got))  # kept in float: clean-fid's point
    with pytest.raises(ValueError, match="uint8"):
        clean_resize(image.astype(np.float32))


def _features(seed, n=300, d=64, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift).astype(np.float32)


def test_frechet_distance_is_clean_fids_and_the_definition():
    f1, f2 = _features(0), _features(1, shift=0.5)
    (mu1, s1), (mu2, s2) = gaussian_statistics(f1), gaussian_statistics(f2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(peer_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # commuting covariances: tr (Σ1 Σ2)^½ = Σ √(λ1 λ2)
    d1, d2 = np.diag(np.arange(1.0, 5.0)), np.diag(np.arange(2.0, 6.0))
    want = 1.0 + np.trace(d1) + np.trace(d2) - 2 * np.sqrt(np.arange(1.0, 5.0) * np.arange(2.0, 6.0)).sum()
    assert frechet_distance(np.zeros(4), d1, np.eye(4)[0], d2) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="differ"):
        frechet_distance(mu1, s1, mu2[:3], s2)


def test_a_singular_product_takes_clean_fids_offset():
    f = _features(2, n=20, d=64)  # 20 samples in 64 dims: singular covariances
    mu, s = gaussian_statistics(f)
    mu2, s2 = gaussian_statistics(_features(3, n=20, d=64))
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(peer_frechet(mu, s, mu2, s2), rel=1e-6)


def test_kernel_distance_is_clean_fids_on_the_same_draws():
    f1, f2 = _features(4, n=150), _features(5, n=120, shift=0.2)
    np.random.seed(7)
    want = peer_kid(f1, f2, num_subsets=20, max_subset_size=100)
    np.random.seed(7)
    got = kernel_distance(f1, f2, num_subsets=20, max_subset_size=100)
    assert got == pytest.approx(want, rel=1e-6)
    values = kid_subsets(f1, f2, 20, 100, rng=np.random.default_rng(0))
    assert values.shape == (20,) and values.std() > 0
    # one subset holding everything: the unbiased MMD² of the definition, computed pairwise
    x, y = f2[:50].astype(np.float64), f1[:50].astype(np.float64)

    def k(a, b):
        return (a @ b / 64 + 1) ** 3

    m = 50
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    everything = kid_subsets(f1[:50], f2[:50], 1, 50, rng=np.random.default_rng(1))[0]
    assert everything == pytest.approx(xx + yy - 2 * xy, rel=1e-4)


# ---- against the clean-fid package itself (a dev dependency) ----------------------------------------


def test_the_three_functions_equal_the_clean_fid_packages():
    from cleanfid import fid as cf
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)
    assert np.array_equal(clean_resize(image), build_resizer("clean")(image))
    f1, f2 = rng.normal(size=(300, 24)), rng.normal(0.2, 1.1, size=(250, 24))
    mu1, s1 = gaussian_statistics(f1)
    mu2, s2 = gaussian_statistics(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid's disp=False on SciPy 1.17
        theirs = cf.frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-6)
    np.random.seed(11)
    theirs = cf.kernel_distance(f1, f2, num_subsets=20, max_subset_size=100)
    assert kernel_distance(f1, f2, 20, 100, rng=np.random.RandomState(11)) == pytest.approx(theirs, rel=1e-6)
