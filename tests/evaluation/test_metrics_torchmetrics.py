"""PSNR, SSIM and the Fréchet distance, now computed by torchmetrics, equal the numbers of
ldmkit's former hand-written implementations on fixed inputs.

The reference values below were produced by the hand-written code (float64 inside, as this
module's inputs) before it was replaced. Tolerances: PSNR 1e-4 dB, SSIM 1e-5 (absolute),
Fréchet distance 1e-6 relative; the agreement measured when they were recorded was about
2e-6 dB (PSNR, the float32 rounding of the result), exact in float32 (SSIM) and 3e-15
relative (Fréchet). Independent references beside them: PSNR from its formula in numpy, the
Fréchet distance of two Gaussians with commuting covariances from the closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldmkit.evaluation.classifier import FashionMNISTClassifier
from ldmkit.evaluation.features import FashionMNISTFeatures
from ldmkit.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_stats,
    frechet_metric,
)
from ldmkit.evaluation.metrics import psnr, ssim

PSNR_DB = 1e-4
SSIM_ABS = 1e-5
FRECHET_REL = 1e-6

# (seed, shape B×C×H×W, noise std) -> hand-written PSNR and SSIM per image
REFERENCE = {
    (0, (4, 1, 28, 28), 0.1): (
        [20.70513916015625, 20.826580047607422, 20.10906219482422, 20.32500457763672],
        [0.947781503200531, 0.9499998092651367, 0.9406013488769531, 0.935993492603302],
    ),
    (1, (3, 3, 32, 24), 0.05): (
        [26.426036834716797, 26.167083740234375, 26.174728393554688],
        [0.98601233959198, 0.9855654239654541, 0.9848061203956604],
    ),
    (2, (2, 1, 64, 64), 0.3): (
        [12.132810592651367, 12.041092872619629],
        [0.6827177405357361, 0.6714440584182739],
    ),
}
# hand-written frechet_distance_from_stats on _gaussian_feature_sets(), fed float32 / float64
FRECHET_REFERENCE = {torch.float32: 8.890999935455127, torch.float64: 8.890999911936063}


def _pair(seed: int, shape: tuple[int, ...], noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    y = (x + noise * torch.randn(shape, generator=gen)).clamp(0, 1)
    return x, y


def _gaussian_feature_sets() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    b = b @ torch.randn(8, 8, generator=gen, dtype=torch.float64) * 0.5 + 0.3
    return a, b


@pytest.mark.parametrize(
    "case", list(REFERENCE), ids=lambda c: f"seed{c[0]}-{'x'.join(map(str, c[1]))}"
)
def test_psnr_and_ssim_equal_the_hand_written_values(case):
    x, y = _pair(*case)
    expected_psnr, expected_ssim = REFERENCE[case]
    np.testing.assert_allclose(psnr(x, y).double().numpy(), expected_psnr, rtol=0, atol=PSNR_DB)
    np.testing.assert_allclose(ssim(x, y).double().numpy(), expected_ssim, rtol=0, atol=SSIM_ABS)


@pytest.mark.parametrize("case", list(REFERENCE), ids=lambda c: f"seed{c[0]}")
def test_psnr_equals_its_formula_in_numpy(case):
    x, y = _pair(*case)
    a, b = x.double().numpy(), y.double().numpy()
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    np.testing.assert_allclose(
        psnr(x, y).double().numpy(), 10 * np.log10(1.0 / mse), rtol=0, atol=PSNR_DB
    )
    np.testing.assert_allclose(
        psnr(2 * x, 2 * y, data_range=2.0).double().numpy(),
        10 * np.log10(4.0 / (4 * mse)),
        rtol=0,
        atol=PSNR_DB,
    )


def test_identical_images_keep_the_finite_psnr_cap_and_ssim_one():
    x, _ = _pair(0, (2, 1, 16, 16), 0.0)
    torch.testing.assert_close(psnr(x, x), torch.full((2,), 100.0))  # 10 log10(1 / eps=1e-10)
    torch.testing.assert_close(ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)


def test_ssim_window_must_be_the_one_torchmetrics_derives_from_sigma():
    x, y = _pair(0, (1, 1, 32, 32), 0.1)
    with pytest.raises(ValueError, match="window_size 7 does not fit sigma 1.5"):
        ssim(x, y, window_size=7)
    assert ssim(x, y, window_size=7, sigma=0.8).shape == (1,)  # 2 * int(3.3) + 1 = 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frechet_distance_from_stats_equals_the_hand_written_value(dtype):
    a, b = _gaussian_feature_sets()
    stats_a, stats_b = FeatureStats(8), FeatureStats(8)
    for chunk in a.to(dtype).split(64):
        stats_a.update(chunk)
    stats_b.update(b.to(dtype))
    assert frechet_distance_from_stats(stats_a, stats_b) == pytest.approx(
        FRECHET_REFERENCE[dtype], rel=FRECHET_REL
    )
    assert stats_a.n == 500 and frechet_distance_from_stats(stats_a, stats_a) == pytest.approx(
        0.0, abs=1e-9
    )


def _commuting_gaussians() -> tuple[torch.Tensor, ...]:
    """N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): the covariances commute, so
    d^2 = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2 = 9 + 4 = 13."""
    q, _ = torch.linalg.qr(
        torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )
    a = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 16.0, 25.0], dtype=torch.float64)
    mu1 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    mu2 = mu1 - torch.tensor([1.0, 2.0, 0.0, -2.0], dtype=torch.float64)
    return mu1, q @ torch.diag(a) @ q.t(), mu2, q @ torch.diag(b) @ q.t()


def _samples_with_moments(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean and (N-1) covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(
        n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.t()))).t()  # sample covariance I
    return z @ torch.linalg.cholesky(cov).t() + mean


def test_frechet_distance_of_two_gaussians_is_the_closed_form():
    mu1, s1, mu2, s2 = _commuting_gaussians()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(13.0, rel=1e-9)
    stats1, stats2 = FeatureStats(4), FeatureStats(4)
    stats1.update(_samples_with_moments(mu1, s1, 300, seed=1))
    stats2.update(_samples_with_moments(mu2, s2, 200, seed=2))
    assert frechet_distance_from_stats(stats1, stats2) == pytest.approx(13.0, rel=1e-9)


def test_the_fashion_mnist_feature_network_plugs_into_torchmetrics_fid(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "classifier.safetensors"
    save_file(
        {k: v.contiguous() for k, v in FashionMNISTClassifier().state_dict().items()}, str(weights)
    )
    features = FashionMNISTFeatures(weights).eval()
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    fake = (real + 0.3 * torch.randn(real.shape, generator=gen)).clamp(-1, 1)

    metric = frechet_metric(features)
    stats_real, stats_fake = (
        FeatureStats(features.num_features),
        FeatureStats(features.num_features),
    )
    with torch.no_grad():
        for lo in range(0, 40, 16):
            metric.update(real[lo : lo + 16], real=True)
            metric.update(fake[lo : lo + 16], real=False)
            stats_real.update(features(real[lo : lo + 16]))
            stats_fake.update(features(fake[lo : lo + 16]))
        value = float(metric.compute())
    assert value > 0
    assert frechet_distance_from_stats(stats_real, stats_fake) == pytest.approx(value, rel=1e-5)


def test_frechet_metric_needs_the_feature_dimension():
    with pytest.raises(ValueError, match="Identity has no integer `num_features`"):
        frechet_metric(nn.Identity())


def test_feature_sets_of_different_sizes_or_too_few_are_refused():
    small, other = FeatureStats(3), FeatureStats(4)
    small.update(torch.zeros(1, 3))
    other.update(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="different dimensions: 3 and 4"):
        frechet_distance_from_stats(small, other)
    with pytest.raises(ValueError, match="at least 2 feature vectors, got 1"):
        frechet_distance_from_stats(small, small)
    assert math.isfinite(frechet_distance_from_stats(other, other))


# -- KID (torchmetrics' KernelInceptionDistance over precomputed features) ----------------------


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² with the cubic polynomial kernel, from its formula (Bińkowski et al.
    2018, eq. 4), in float64."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_equals_the_unbiased_mmd_formula_on_the_whole_sets():
    from ldmkit.evaluation.frechet import kernel_distance

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    fake = 0.5 + 1.3 * torch.randn(60, 8, generator=gen, dtype=torch.float64)
    # one subset of all 60: a permutation of the whole set, so the value is the formula's
    mean, std = kernel_distance(real, fake, subsets=1, subset_size=60)
    assert mean == pytest.approx(mmd2_unbiased(real.numpy(), fake.numpy()), rel=1e-9)
    assert mean > 0.05  # different distributions
    same, _ = kernel_distance(real[:30], real[30:], subsets=1, subset_size=30)
    assert abs(same) < 0.2 * mean  # unbiased: about zero for one distribution


def test_kid_subsets_are_seeded_and_leave_the_global_random_state_alone():
    from ldmkit.evaluation.frechet import kernel_distance

    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, 4, generator=gen), torch.randn(200, 4, generator=gen) + 0.3
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = kernel_distance(real, fake, subset_size=50, subsets=20, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert kernel_distance(real, fake, subset_size=50, subsets=20, seed=7) == first
    assert first[1] > 0  # the std over subsets
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        kernel_distance(real[:1], fake)
    with pytest.raises(ValueError, match="N×d feature sets of one d"):
        kernel_distance(real, fake[:, :3])
