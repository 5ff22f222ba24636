"""DPM-Solver++(2S) with ancestral noise: Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models", 2022, Algorithm 1 (the
second-order singlestep solver, data prediction, ``r = 1/2``), stepping down to ``sigma_down``
and then adding fresh noise up to ``sigma_next`` as ``euler_ancestral`` does (k-diffusion's
``sample_dpmpp_2s_ancestral``).

With ``lambda = -log sigma``, ``h = lambda(sigma_down) - lambda(sigma)`` and the midpoint
``sigma_s = sqrt(sigma sigma_down)``::

    u      = (sigma_s / sigma) x + (1 - exp(-h / 2)) D(x; sigma)
    x_next = (sigma_down / sigma) x + (1 - exp(-h)) D(u; sigma_s) + sigma_up n,   n ~ N(0, I)

A step with ``sigma_down = 0`` (the last one) is Euler's: it returns ``D(x; sigma)`` (plus
``sigma_up n`` if ``eta`` is large enough to send an earlier step there). ``eta = 0`` is
deterministic DPM-Solver++(2S).
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep
from ldmkit_samplers.euler_ancestral import ancestral_step, check_eta
from ldmkit_samplers.orders import NoiselessOrder


class DPMSolverPP2SAncestralSampler(NoiselessOrder, SigmaSampler):
    """Stochastic for ``eta > 0`` (deterministic, second order, at ``eta = 0``); two denoiser
    evaluations per step, one on a step that ends at sigma = 0. Default spacing: ``linspace``.

    :param eta: scales the noise re-injected at each step (1: DDPM's ancestral variance).
    """

    ode_order = 2  # at eta = 0 (orders.NoiselessOrder)

    def __init__(
        self,
        *,
        steps: int = 20,
        eta: float = 1.0,
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        self.eta = check_eta(eta)

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:  # a repeated level (``quad``): no step
            return s.x
        sigma_down, sigma_up = ancestral_step(s.sigma, s.sigma_next, self.eta)
        if sigma_down == 0:
            x = s.denoised  # Euler's step to sigma = 0
        else:
            h = math.log(s.sigma / sigma_down)
            sigma_mid = math.sqrt(s.sigma * sigma_down)  # lambda halfway
            u = (sigma_mid / s.sigma) * s.x - math.expm1(-h / 2) * s.denoised
            x = (sigma_down / s.sigma) * s.x - math.expm1(-h) * s.model(u, sigma_mid)
        if sigma_up > 0:
            x = x + sigma_up * s.noise()
        return x

    def __repr__(self) -> str:
        return (
            f"DPMSolverPP2SAncestralSampler(steps={self.steps}, eta={self.eta}, "
            f"spacing={self.spacing!r})"
        )
