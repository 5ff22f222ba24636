"""Euler's method on the probability-flow ODE: Karras, Aittala, Aila & Laine, "Elucidating the
Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 2 without its
second-order correction, as k-diffusion's ``sample_euler``: with the default ``s_churn = 0`` no
noise is added (Algorithm 1 without the correction); ``s_churn > 0`` adds Algorithm 2's churn
(:mod:`ldmkit_samplers.churn`).

In the variables ``x = z_t / sqrt(a_t)``, ``sigma = sqrt((1 - a_t) / a_t)`` the ODE (eq. 1 with
sigma(t) = t, s(t) = 1, and the score of eq. 3) is ``dx / dsigma = (x - D(x; sigma)) / sigma``.
On the discrete schedule's own sigmas this is the deterministic DDIM step.
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import SigmaStep
from ldmkit_samplers.churn import ChurnSampler


class EulerSampler(ChurnSampler):
    """``x_next = x + (sigma_next - sigma) (x - D(x; sigma)) / sigma``: first order, one
    denoiser evaluation per step. Default spacing: ``linspace``. Deterministic unless
    ``s_churn > 0``."""

    ode_order = 1

    def step(self, s: SigmaStep) -> Tensor:
        d = (s.x - s.denoised) / s.sigma
        return s.x + (s.sigma_next - s.sigma) * d
