"""DPM-Solver-2 with ancestral noise: k-diffusion's ``sample_dpm_2_ancestral``. Each step is
``dpm_2``'s (Lu et al. 2022, DPM-Solver-2, in Karras' variables: :mod:`ldmkit_samplers.dpm_2`)
down to ``sigma_down``, then fresh noise up to ``sigma_next`` (``euler_ancestral``'s
``sigma_down`` / ``sigma_up``, :func:`ldmkit_samplers.euler_ancestral.ancestral_step`).

One difference from k-diffusion: where ``eta > 1`` makes ``sigma_down = 0`` before the last step,
k-diffusion steps to ``D(x; sigma)`` and adds no noise (the chain leaves the noise level
``sigma_next``); here that step adds ``sigma_up = sigma_next`` of noise, as ``euler_ancestral``
and k-diffusion's ``sample_dpmpp_2s_ancestral`` do.
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, SigmaStep
from ldmkit_samplers.dpm_2 import dpm_solver_2
from ldmkit_samplers.euler_ancestral import ancestral_step, check_eta
from ldmkit_samplers.orders import NoiselessOrder


class DPM2AncestralSampler(NoiselessOrder, SigmaSampler):
    """Stochastic for ``eta > 0`` (``dpm_2`` at ``eta = 0``); two denoiser evaluations per
    step, one on a step that ends at sigma = 0. Default spacing: ``linspace``.

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
        x = dpm_solver_2(s, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * s.noise()
        return x

    def __repr__(self) -> str:
        return f"DPM2AncestralSampler(steps={self.steps}, eta={self.eta}, spacing={self.spacing!r})"
