"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", 2022, Algorithm 2 (k-diffusion's
``sample_dpmpp_2m`` form).

A multistep exponential integrator for the data-prediction ODE in ``lambda = -log sigma`` (half
the log-SNR). With ``h = lambda_next - lambda`` and ``r = h_prev / h``::

    x_next = (sigma_next / sigma) x + (1 - exp(-h)) D
    D = (1 + 1 / (2 r)) D(x; sigma) - 1 / (2 r) D_prev       (first step: D = D(x; sigma))

The first step, and a step to sigma = 0 (where it returns ``D(x; sigma)``), are first order;
the others are second order.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep


class DPMSolverPP2MSampler(SigmaSampler):
    """Deterministic, second order; one denoiser evaluation per step. Default spacing:
    ``linspace``."""

    convergence_order = 2

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:
            # a repeated timestep (``quad`` spacing repeats small ones): no step, and the
            # history keeps the last real step, whose h_prev is not 0
            return s.x
        previous = s.state.get("previous")  # (lambda, D) of the step before
        lam = -math.log(s.sigma)
        s.state["previous"] = (lam, s.denoised)
        if s.sigma_next == 0:
            return s.denoised
        h = -math.log(s.sigma_next) - lam
        denoised = s.denoised
        if previous is not None:
            r = (lam - previous[0]) / h
            denoised = (1 + 1 / (2 * r)) * s.denoised - (1 / (2 * r)) * previous[1]
        return (s.sigma_next / s.sigma) * s.x - math.expm1(-h) * denoised
