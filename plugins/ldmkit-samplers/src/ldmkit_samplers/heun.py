"""Heun's second-order method on the probability-flow ODE: Karras, Aittala, Aila & Laine,
"Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1.

In the variables ``x = z_t / sqrt(a_t)``, ``sigma = sqrt((1 - a_t) / a_t)`` the ODE is
``dx / dsigma = (x - D(x; sigma)) / sigma`` (eq. 1 with sigma(t) = t, s(t) = 1, and eq. 3).
Each step takes an Euler step, evaluates the slope at its end and averages the two slopes
(the trapezoidal rule); the step to sigma = 0 stays Euler, where the slope is undefined.
``s_churn > 0`` adds Algorithm 2's churn (:mod:`ldmkit_samplers.churn`), as k-diffusion's
``sample_heun``.
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import SigmaStep
from ldmkit_samplers.churn import ChurnSampler


class HeunSampler(ChurnSampler):
    """Deterministic (unless ``s_churn > 0``), second order; two denoiser evaluations per step
    (one on a last step that ends at sigma = 0). Default spacing: ``linspace``."""

    ode_order = 2

    def step(self, s: SigmaStep) -> Tensor:
        d = (s.x - s.denoised) / s.sigma
        dt = s.sigma_next - s.sigma
        x_euler = s.x + dt * d
        if s.sigma_next == 0:
            return x_euler
        d_next = (x_euler - s.model(x_euler, s.sigma_next)) / s.sigma_next
        return s.x + dt * (d + d_next) / 2
