"""PSNR, SSIM and the Fréchet distance against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.evaluation.frechet import FeatureStats, frechet_distance
from ldmkit.evaluation.metrics import psnr, ssim


def _pair(seed=0, shape=(3, 2, 24, 20)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    y = (x + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
    return x, y


def test_psnr_by_hand():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[0.1, 0.0], [0.0, 0.1]]]])  # MSE = 0.005
    assert float(psnr(x, y)) == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-6)
    assert float(psnr(x, y, data_range=2.0)) == pytest.approx(10 * math.log10(4 / 0.005), rel=1e-6)


def test_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    ours_psnr, ours_ssim = psnr(x, y), ssim(x, y)
    for i in range(x.shape[0]):
        a, b = x[i].double().numpy(), y[i].double().numpy()
        assert float(ours_psnr[i]) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-5)
        reference = metrics.structural_similarity(
            a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=True,
        )
        assert float(ours_ssim[i]) == pytest.approx(reference, abs=1e-6)


def test_ssim_of_identical_images_is_one_and_small_images_are_refused():
    x, _ = _pair()
    torch.testing.assert_close(ssim(x, x), torch.ones(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_frechet_distance_one_dimensional_closed_form():
    # d^2 = (m1 - m2)^2 + (s1 - s2)^2 for 1-D Gaussians with std s1, s2
    d = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 6, generator=gen, dtype=torch.float64), torch.randn(300, 6, generator=gen, dtype=torch.float64)
    b = b @ torch.randn(6, 6, generator=gen, dtype=torch.float64) + 0.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.t()), torch.cov(b.t())
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + float(torch.trace(s1) + torch.trace(s2)) - 2 * covmean.trace()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_feature_stats_match_torch_cov():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(50, 4, generator=gen)
    stats = FeatureStats(4)
    for chunk in features.split(7):
        stats.update(chunk)
    mean, cov = stats.mean_cov()
    torch.testing.assert_close(mean, features.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(features.double().t()))
    with pytest.raises(ValueError, match="expected 4-dim"):
        stats.update(torch.zeros(2, 3))
