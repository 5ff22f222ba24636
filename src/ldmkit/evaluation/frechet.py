"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

``Tr((S_1 S_2)^{1/2})`` is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix ``S_1^{1/2} S_2 S_1^{1/2}`` (same spectrum as S_1 S_2), in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FeatureStats:
    """Running mean and covariance of feature vectors (float64)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-dim features, got {f.shape[1]}")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, cov


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.t()) / 2)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.t()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.t()) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return float(d2.clamp_min(0))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(*a.mean_cov(), *b.mean_cov())
