"""DPM-Solver-2 on the probability-flow ODE in Karras' variables: k-diffusion's ``sample_dpm_2``
("a sampler inspired by DPM-Solver-2 and Algorithm 2 from Karras et al. (2022)"): Lu, Zhou, Bao,
Chen, Li & Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps", NeurIPS 2022, Algorithm 1 (DPM-Solver-2, ``r = 1/2``), with its steps taken
as Euler steps of ``dx / dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 1, 3).

Each step is the explicit midpoint rule with the midpoint halfway in log sigma::

    sigma_mid = sqrt(sigma sigma_next)
    x_mid     = x + (sigma_mid - sigma) d(x, sigma)
    x_next    = x + (sigma_next - sigma) d(x_mid, sigma_mid)

A step to sigma = 0 is Euler's (it returns ``D(x; sigma)``). ``s_churn > 0`` adds Karras'
Algorithm 2 churn before each step (:mod:`ldmkit_samplers.churn`), as ``sample_dpm_2`` does.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaStep
from ldmkit_samplers.churn import ChurnSampler


def dpm_solver_2(s: SigmaStep, sigma_to: float) -> Tensor:
    """x at ``sigma_to`` by one DPM-Solver-2 step from ``s.x`` (Euler's when ``sigma_to = 0``)."""
    d = (s.x - s.denoised) / s.sigma
    if sigma_to == 0:
        return s.x + (sigma_to - s.sigma) * d
    sigma_mid = math.sqrt(s.sigma * sigma_to)  # halfway in log sigma
    x_mid = s.x + (sigma_mid - s.sigma) * d
    d_mid = (x_mid - s.model(x_mid, sigma_mid)) / sigma_mid
    return s.x + (sigma_to - s.sigma) * d_mid


class DPM2Sampler(ChurnSampler):
    """Deterministic (unless ``s_churn > 0``), second order; two denoiser evaluations per step
    (one on a last step that ends at sigma = 0). Default spacing: ``linspace``."""

    ode_order = 2

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:  # a repeated level (``quad``): no step
            return s.x
        return dpm_solver_2(s, s.sigma_next)
