"""DPM-Solver++(3M) SDE: the third-order multistep solver of Lu, Zhou, Bao, Chen, Li & Zhu,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022 (data
prediction, Appendix B's multistep form), on the diffusion SDE as k-diffusion's
``sample_dpmpp_3m_sde`` writes it.

With ``lambda = -log sigma``, ``h = lambda_next - lambda``, ``h_eta = (1 + eta) h``, the last
two steps' ``h_1``, ``h_2`` and denoised estimates ``D_1``, ``D_2``, ``r0 = h_1 / h``,
``r1 = h_2 / h``::

    x_next = (sigma_next / sigma) exp(-eta h) x + (1 - exp(-h_eta)) D
             + phi_2 d1 - phi_3 d2 + sigma_next sqrt(1 - exp(-2 eta h)) n,   n ~ N(0, I)
    d1_0 = (D - D_1) / r0,  d1_1 = (D_1 - D_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),  d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = (exp(-h_eta) - 1) / h_eta + 1,  phi_3 = phi_2 / h_eta - 1/2

The first step is first order, the second uses ``phi_2 (D - D_1) / r0`` only (second order), and
a step to sigma = 0 returns ``D(x; sigma)``. ``eta = 0`` is the probability-flow ODE
(deterministic DPM-Solver++(3M)). k-diffusion draws ``n`` from a Brownian tree by default; here
each step draws fresh per-sample normals (``SigmaStep.noise``): the same distribution.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep
from ldmkit_samplers.euler_ancestral import check_eta
from ldmkit_samplers.orders import NoiselessOrder


class DPMSolverPP3MSDESampler(NoiselessOrder, SigmaSampler):
    """Stochastic for ``eta > 0`` (deterministic, third order, at ``eta = 0``); one denoiser
    evaluation per step. Default spacing: ``karras`` (on ``linspace``, whose steps in
    ``lambda`` grow a hundredfold towards sigma_min, the multistep terms amplify the noise: 20
    steps give N(0.5, 0.3^2) data a std of 1.3, ``karras`` 0.31).

    :param eta: scales the noise of the SDE (1: the reverse SDE, 0: the probability-flow ODE).
    """

    ode_order = 3  # at eta = 0 (orders.NoiselessOrder)

    default_spacing = "karras"

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
        if s.sigma_next == s.sigma:
            # a repeated level (``quad`` spacing repeats small ones): no step, and the history
            # keeps the last real steps, whose h are not 0
            return s.x
        if s.sigma_next == 0:
            return s.denoised
        h = math.log(s.sigma / s.sigma_next)
        h_eta = (1 + self.eta) * h
        x = math.exp(-h_eta) * s.x - math.expm1(-h_eta) * s.denoised
        history: list[tuple[float, Tensor]] = s.state.setdefault("history", [])  # newest first
        if history:
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            (h_1, d_1), *older = history
            r0 = h_1 / h
            d1_0 = (s.denoised - d_1) / r0
            if older:
                h_2, d_2 = older[0]
                r1 = h_2 / h
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            else:
                x = x + phi_2 * d1_0
        history.insert(0, (h, s.denoised))
        del history[2:]
        if self.eta > 0:
            x = x + s.sigma_next * math.sqrt(-math.expm1(-2 * self.eta * h)) * s.noise()
        return x

    def __repr__(self) -> str:
        return (
            f"DPMSolverPP3MSDESampler(steps={self.steps}, eta={self.eta}, spacing={self.spacing!r})"
        )
