"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID):

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

computed by torchmetrics' ``FrechetInceptionDistance``, whose ``feature`` may be any
``nn.Module``: :func:`frechet_metric` plugs in ldmkit's offline feature networks
(:mod:`ldmkit.evaluation.features`), and :class:`FeatureStats` keeps one image set's features
in the metric's own running state (float64 sum and sum of outer products, constant memory),
so one set of real statistics can be scored against many generated sets.

:func:`kernel_distance` is the Kernel Inception Distance (Bińkowski et al. 2018) over the same
features, by torchmetrics' ``KernelInceptionDistance``: unbiased, so unlike the Fréchet
distance it does not favour large sample sets, which makes it the fairer number for the few
hundred samples a CPU benchmark draws.

torchmetrics is imported on first use (it costs seconds; see :mod:`ldmkit.evaluation.metrics`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

_SIDE_STATE = ("features_sum", "features_cov_sum", "features_num_samples")


class PrecomputedFeatures(nn.Module):
    """The identity as a torchmetrics feature network, for feature vectors computed elsewhere.
    Its float64 output makes the metric return float64."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


def frechet_metric(feature: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID over ``feature``, a module mapping a batch to N×d features that names
    d as ``num_features`` (ldmkit's feature networks do; without it torchmetrics probes the
    module with a 3×299×299 uint8 image). ``update(images, real=...)`` then ``compute()``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not isinstance(getattr(feature, "num_features", None), int):
        raise ValueError(f"{type(feature).__name__} has no integer `num_features` (the feature dimension)")
    return FrechetInceptionDistance(feature=feature)


class FeatureStats:
    """Feature vectors (N×dim) of one image set, accumulated batch by batch in the real-image
    state of a torchmetrics FID metric."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.metric = frechet_metric(PrecomputedFeatures(dim))

    @property
    def n(self) -> int:
        return int(self.metric.real_features_num_samples)

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu").reshape(features.shape[0], -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-dim features, got {f.shape[1]}")
        self.metric.update(f, real=True)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance (N-1 normalization), as the metric computes them."""
        self._check_enough()
        mean = self.metric.real_features_sum / self.n
        cov = (self.metric.real_features_cov_sum - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, cov

    def _check_enough(self) -> None:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """The distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, by the function
    ``FrechetInceptionDistance.compute`` uses (``Tr((S_1 S_2)^{1/2})`` as the sum of the
    square roots of the eigenvalues of ``S_1 S_2``)."""
    from torchmetrics.image.fid import _compute_fid

    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    return float(_compute_fid(mu1, sigma1, mu2, sigma2).clamp_min(0))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two feature sets: a copy of ``a``'s metric with ``b``'s statistics as its
    fake half (neither argument changes)."""
    if a.dim != b.dim:
        raise ValueError(f"feature sets of different dimensions: {a.dim} and {b.dim}")
    a._check_enough()
    b._check_enough()
    pair = a.metric.clone()
    for name in _SIDE_STATE:
        setattr(pair, f"fake_{name}", getattr(b.metric, f"real_{name}").clone())
    return float(pair.compute().clamp_min(0))


def kernel_distance(
    real: Tensor, fake: Tensor, *, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID between two feature sets (N×d): the unbiased MMD² with the kernel
    ``k(x, y) = (x·y / d + 1)³``, averaged over ``subsets`` random subsets of
    ``min(subset_size, N_real, N_fake)`` vectors per side; returns (mean, std over subsets).
    The subsets are drawn from ``seed`` (the global random state is left as it was)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID needs two N×d feature sets of one d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {real.shape[0]} and {fake.shape[0]}")
    with warnings.catch_warnings():  # that it keeps the features: they are in memory already
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real.detach().cpu(), real=True)
    metric.update(fake.detach().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class FeaturePair:
    """The features of real images and of generated ones, batch by batch: the Fréchet distance
    between their statistics and the KID of the feature vectors (kept, as KID needs them)."""

    def __init__(self) -> None:
        self.real: FeatureStats | None = None
        self.fake: FeatureStats | None = None
        self.real_features: list[Tensor] = []
        self.fake_features: list[Tensor] = []

    def update(self, real: Tensor, fake: Tensor) -> None:
        if self.real is None:
            self.real, self.fake = FeatureStats(real.shape[1]), FeatureStats(real.shape[1])
        self.real.update(real)
        self.fake.update(fake)
        self.real_features.append(real.detach().cpu())
        self.fake_features.append(fake.detach().cpu())

    def scores(self) -> dict[str, float | None]:
        """``frechet_distance``, ``kid`` and ``kid_std``: None before two images."""
        if self.real is None or self.real.n < 2:  # a covariance needs two feature vectors
            return {"frechet_distance": None, "kid": None, "kid_std": None}
        real, fake = torch.cat(self.real_features), torch.cat(self.fake_features)
        kid = kernel_distance(real, fake) if len(real) > 1 else (None, None)
        return {"frechet_distance": frechet_distance_from_stats(self.real, self.fake), "kid": kid[0], "kid_std": kid[1]}
