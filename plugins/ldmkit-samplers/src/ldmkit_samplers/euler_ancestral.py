"""Euler ancestral: an Euler step on the probability-flow ODE (Karras et al. 2022, eq. 1 and 3)
down to ``sigma_down``, then fresh noise up to ``sigma_next`` (k-diffusion's
``sample_euler_ancestral`` and ``get_ancestral_step``).

``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))`` and
``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, so the step keeps the marginal noise level
``sigma_next``. ``sigma_up`` is DDIM's sigma (Song et al. 2021, eq. 16) in these variables:
with the same noise this is DDIM's chain with the same ``eta``, and ``eta = 1`` is DDPM's
ancestral sampler (Ho et al. 2020, eq. 6-7); ``eta = 0`` is plain Euler.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep
from ldmkit_samplers.orders import NoiselessOrder


def check_eta(eta: float) -> float:
    """``eta``, or a one-line ``ValueError``: NaN passed ``eta < 0`` and made NaN images."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    return eta


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` for an ancestral step from ``sigma`` to ``sigma_next``."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(
        sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    )
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


class EulerAncestralSampler(NoiselessOrder, SigmaSampler):
    """Stochastic; one denoiser evaluation per step. Default spacing: ``linspace``.

    :param eta: scales the noise re-injected at each step (1: DDPM's ancestral variance).
    """

    ode_order = 1  # at eta = 0 (orders.NoiselessOrder)

    def __init__(
        self,
        *,
        steps: int = 50,
        eta: float = 1.0,
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        self.eta = check_eta(eta)

    def step(self, s: SigmaStep) -> Tensor:
        sigma_down, sigma_up = ancestral_step(s.sigma, s.sigma_next, self.eta)
        x = s.x + (sigma_down - s.sigma) * (s.x - s.denoised) / s.sigma
        if sigma_up > 0:
            x = x + sigma_up * s.noise()
        return x

    def __repr__(self) -> str:
        return (
            f"EulerAncestralSampler(steps={self.steps}, eta={self.eta}, spacing={self.spacing!r})"
        )
