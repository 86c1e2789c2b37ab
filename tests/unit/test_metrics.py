"""PSNR and SSIM against scikit-image's independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipeline.metrics.quality import psnr, ssim


@pytest.mark.parametrize("noise", [2.0, 20.0, 60.0])
def test_psnr_and_ssim_match_skimage(noise):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).round()
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    ours_p, ours_s = psnr(ta, tb), ssim(ta, tb)
    for i in range(2):
        assert ours_p[i].item() == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=255), rel=1e-9)
        ref = structural_similarity(a[i], b[i], data_range=255, channel_axis=2, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert ours_s[i].item() == pytest.approx(ref, abs=1e-6)
