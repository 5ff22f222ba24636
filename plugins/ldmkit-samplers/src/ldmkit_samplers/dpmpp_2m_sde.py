"""DPM-Solver++(2M) SDE: Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", 2022, Sec. 5 / Appendix (the second-order multistep
solver of the diffusion SDE in data prediction), in k-diffusion's ``sample_dpmpp_2m_sde`` form.

With ``lambda = -log sigma``, ``h = lambda_next - lambda``, ``r = h_prev / h`` and
``eta`` scaling the SDE's noise (0: the probability-flow ODE)::

    x_next = (sigma_next / sigma) exp(-eta h) x + (1 - exp(-(1 + eta) h)) D(x; sigma)
             + c (D(x; sigma) - D_prev) / r
             + sigma_next sqrt(1 - exp(-2 eta h)) n,     n ~ N(0, I)

with ``c = (1 - exp(-(1 + eta) h)) / 2`` (``solver_type="midpoint"``) or
``c = 1 - (1 - exp(-(1 + eta) h)) / ((1 + eta) h)`` (``"heun"``). The first
step has no ``D_prev`` (first order), and a step to sigma = 0 returns ``D(x; sigma)``. At
``eta = 0`` the midpoint form is DPM-Solver++(2M) (``dpmpp_2m``).

k-diffusion draws ``n`` from a Brownian tree by default; here each step draws fresh per-sample
normals (``SigmaStep.noise``): the same distribution, not the same draws.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep
from ldmkit_samplers.euler_ancestral import check_eta
from ldmkit_samplers.orders import NoiselessOrder

SOLVER_TYPES = ("midpoint", "heun")


class DPMSolverPP2MSDESampler(NoiselessOrder, SigmaSampler):
    """Stochastic for ``eta > 0`` (deterministic, second order, at ``eta = 0``); one denoiser
    evaluation per step. Default spacing: ``karras`` (on ``linspace``, whose steps in
    ``lambda`` grow a hundredfold towards sigma_min, the multistep term amplifies the noise:
    20 steps give N(0.5, 0.3^2) data a std of 0.44, ``karras`` 0.31).

    :param eta: scales the noise of the SDE (1: the reverse SDE, 0: the probability-flow ODE).
    :param solver_type: ``midpoint`` or ``heun``: how the multistep correction is weighted.
    """

    ode_order = 2  # at eta = 0 (orders.NoiselessOrder)

    default_spacing = "karras"

    def __init__(
        self,
        *,
        steps: int = 20,
        eta: float = 1.0,
        solver_type: str = "midpoint",
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        self.eta = check_eta(eta)
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.solver_type = solver_type

    def step(self, s: SigmaStep) -> Tensor:
        if s.sigma_next == s.sigma:
            # a repeated level (``quad`` spacing repeats small ones): no step, and the history
            # keeps the last real step, whose h is not 0
            return s.x
        if s.sigma_next == 0:
            return s.denoised
        h = math.log(s.sigma / s.sigma_next)
        eta_h = self.eta * h
        decay = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = (s.sigma_next / s.sigma) * math.exp(-eta_h) * s.x + decay * s.denoised
        previous = s.state.get("previous")  # (h, D) of the step before
        s.state["previous"] = (h, s.denoised)
        if previous is not None:
            r = previous[0] / h
            if self.solver_type == "heun":
                weight = 1 - decay / (h + eta_h)
            else:
                weight = decay / 2
            x = x + (weight / r) * (s.denoised - previous[1])
        if self.eta > 0:
            x = x + s.sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s.noise()
        return x

    def __repr__(self) -> str:
        return (
            f"DPMSolverPP2MSDESampler(steps={self.steps}, eta={self.eta}, "
            f"solver_type={self.solver_type!r}, spacing={self.spacing!r})"
        )
