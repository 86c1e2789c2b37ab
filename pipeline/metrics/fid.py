"""FID and KID as clean-fid computes them in its default "clean" mode (GaParmar/clean-fid, commit
e88c4d6): the resize every image gets before the Inception network, and the two distances on feature
arrays. Plain numpy (and PIL, scipy), so a job, a test and a notebook call the same three functions.

  clean_resize(uint8 HWC)          → float32 (299, 299, 3): PIL bicubic per channel in float, clipped
                                     (cleanfid/resize.py:41-57, ``make_resizer("PIL", False, "bicubic",
                                     (299, 299))``, which ``build_resizer("clean")`` builds, resize.py:11-13)
  frechet_distance(μ1, Σ1, μ2, Σ2) → ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ (cleanfid/fid.py:37-87)
  kernel_distance(f1, f2)          → KID: the unbiased MMD² with the kernel (x·y/d + 1)³, averaged over
                                     ``num_subsets`` random subsets of at most ``max_subset_size``
                                     (cleanfid/fid.py:93-110)

Why written out rather than imported: clean-fid fetches its Inception weights from the network when it
builds its feature extractor and reads images through its own file loaders; a pipeline that never
downloads at run time and streams shards through Ray needs the formulas alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLEAN_SIZE = (299, 299)  # the FID Inception network's input (cleanfid/resize.py:13)


def clean_resize(image: np.ndarray, size: tuple[int, int] = CLEAN_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) → float32 (size[1], size[0], 3) in [0, 255]: each channel resized alone as a PIL
    float image with bicubic filtering, never quantised (clean-fid's point: no uint8 rounding, no
    aliasing of torch's bicubic)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"clean_resize takes uint8 (H, W, 3) images, got {image.dtype} {image.shape}")
    width, height = size
    channels = []
    for c in range(3):
        resized = Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize(size, resample=Image.BICUBIC)
        channels.append(np.asarray(resized).clip(0, 255).reshape(height, width, 1))
    return np.concatenate(channels, axis=2).astype(np.float32)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """The Fréchet distance of two Gaussians. (Σ1 Σ2)^½ by ``scipy.linalg.sqrtm``; where it is not finite
    (a nearly singular product) both covariances get ``eps`` on their diagonal, and the imaginary part
    numerical error leaves is dropped, both as clean-fid does."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: means {mu1.shape} / {mu2.shape}, covariances {sigma1.shape} / "
                         f"{sigma2.shape} differ")
    diff = mu1 - mu2
    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` without its error report, whatever the SciPy: clean-fid passes
    ``disp=False`` (deprecated in SciPy 1.17, gone in 1.18, which returns the root alone)."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # a singular product: disp=False's silence
        try:
            return linalg.sqrtm(a, disp=False)[0]
        except TypeError:
            return linalg.sqrtm(a)


def kid_subsets(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                rng=None) -> np.ndarray:
    """The unbiased MMD² of each random subset pair (its mean is KID, its spread KID's ± std).

    ``rng`` draws the subsets (``np.random`` by default: the global stream clean-fid draws from, in its
    order — feats2 first — so a seeded run gives clean-fid's number)."""
    rng = np.random if rng is None else rng
    d = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # k(x, x') + k(y, y')
        b = (x @ y.T / d + 1) ** 3  # k(x, y)
        values[i] = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    return values


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                    rng=None) -> float:
    """KID: the mean of ``kid_subsets``."""
    return float(kid_subsets(feats1, feats2, num_subsets, max_subset_size, rng).mean())


def gaussian_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of a feature array in float64, as clean-fid takes them (``np.mean(axis=0)``,
    ``np.cov(rowvar=False)``, cleanfid/fid.py:271-272), the mean in float64 too."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


# ---- the same resize as two matrix products, on the device ----------------------------------------


def pil_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: the weights PIL's bicubic resize gives each input pixel of one axis, as
    Pillow's ``precompute_coeffs`` (src/libImaging/Resample.c) computes them: Keys' cubic with a = −0.5,
    its support widened by the scale when shrinking (the antialiasing clean-fid is about), each row
    normalised to sum 1."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened when shrinking
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero
        xmax = min(int(center + support + 0.5), n_in)
        x = (np.arange(xmin, xmax) - center + 0.5) / filterscale
        w = _keys_cubic(x)
        total = w.sum()
        weights[xx, xmin:xmax] = w / total if total != 0 else w
    return weights


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Pillow's ``bicubic_filter`` (Resample.c)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


class DeviceResize:
    """uint8 (N, H, W, 3) on any device → float32 (N, 3, 299, 299) in [0, 255] on the same device: the
    resize of ``clean_resize`` as ``W_h · X · W_wᵀ`` per channel, horizontal pass first as Pillow does, so
    the images cross to the device as uint8 and the host does no per-image work. It differs from PIL by
    float32 rounding alone (PIL accumulates in double, stores float32): under 1e-3 on the 0–255 scale,
    tests/unit/test_fid.py. The weights are built once per input shape and device."""

    def __init__(self, size: tuple[int, int] = CLEAN_SIZE):
        self.size = size  # (width, height), as PIL and clean-fid give it
        self._weights: dict = {}

    def weights(self, height: int, width: int, device):
        import torch

        key = (height, width, str(device))
        if key not in self._weights:
            out_w, out_h = self.size
            self._weights[key] = (torch.from_numpy(pil_bicubic_weights(height, out_h)).float().to(device),
                                  torch.from_numpy(pil_bicubic_weights(width, out_w)).float().to(device))
        return self._weights[key]

    def __call__(self, images):
        import torch

        n, h, w, _ = images.shape
        wh, ww = self.weights(h, w, images.device)
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        with torch.autocast(images.device.type, enabled=False):
            x = torch.matmul(x, ww.T)  # horizontal: (N, 3, H, W_out)
            x = torch.matmul(wh, x)  # vertical: (N, 3, H_out, W_out)
        return x.clamp_(0, 255)
