"""Karras, Aittala, Aila & Laine 2022, Algorithm 2's stochastic churn, as k-diffusion 0.1.1's
``sample_euler``, ``sample_heun`` and ``sample_dpm_2`` take it (``s_churn``, ``s_tmin``,
``s_tmax``, ``s_noise``).

Before step i of N, where ``s_tmin <= sigma_i <= s_tmax``, the level is raised to
``sigma_hat = (1 + gamma) sigma_i`` with ``gamma = min(s_churn / N, sqrt(2) - 1)`` by adding
``sqrt(sigma_hat^2 - sigma_i^2) s_noise`` of fresh noise; the step then runs from
``(x_hat, sigma_hat)`` to ``sigma_{i+1}``. ``s_churn = 0`` (the default) adds nothing and
draws nothing; with ``s_churn > 0`` every step draws its noise, as k-diffusion's do, also
where ``gamma = 0``, so the same noise gives k-diffusion's chain.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import SigmaSampler, randn_like
from ldmkit.diffusion.sampling import GeneratorArg
from ldmkit_samplers.orders import NoiselessOrder


class ChurnSampler(NoiselessOrder, SigmaSampler):
    """A :class:`SigmaSampler` with Karras' churn options.

    :param s_churn: total churn over the chain (0: deterministic, the plain ODE solver).
    :param s_tmin: churn only at noise levels ``sigma >= s_tmin`` ...
    :param s_tmax: ... and ``sigma <= s_tmax`` (None, the default: no upper bound; a settings
        file keeps it as JSON's null, where an infinity is not JSON).
    :param s_noise: scales the added noise (Karras' ``S_noise``, slightly above 1 in the paper).
    """

    def __init__(
        self,
        *,
        steps: int = 50,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float | None = None,
        s_noise: float = 1.0,
        spacing: str | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing, quantize=quantize)
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            if not (math.isfinite(value) and value >= 0):  # nan passed `< 0`
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if s_tmax is not None and (math.isnan(s_tmax) or s_tmax < 0):
            raise ValueError(f"s_tmax must be a number >= 0 (null: no bound), got {s_tmax}")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def draws_noise(self) -> bool:  # convergence_order: the solver's ode_order without churn
        return self.s_churn != 0

    def churn(
        self, x: Tensor, sigma: float, i: int, steps: int, generator: GeneratorArg
    ) -> tuple[Tensor, float]:
        if self.s_churn == 0:
            return x, sigma
        inside = self.s_tmin <= sigma and (self.s_tmax is None or sigma <= self.s_tmax)
        gamma = min(self.s_churn / steps, 2**0.5 - 1) if inside else 0.0
        eps = randn_like(x, generator) * self.s_noise
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
        return x, sigma_hat

    def __repr__(self) -> str:
        churn = (
            f", s_churn={self.s_churn}, s_tmin={self.s_tmin}, s_tmax={self.s_tmax}, "
            f"s_noise={self.s_noise}"
            if self.s_churn
            else ""
        )
        return f"{type(self).__name__}(steps={self.steps}{churn}, spacing={self.spacing!r})"
