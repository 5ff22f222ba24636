"""DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12 and 16.

With ``spacing="paper"`` this is the paper's ``DDIMSampler`` step for step (its timesteps
``range(0, T, T // S) + 1`` and its last step to alpha_bar_0).
"""

from __future__ import annotations

import math

from torch import Tensor

from ldmkit.diffusion import DiscreteSampler, DiscreteStep
from ldmkit_samplers.orders import NoiselessOrder


class DDIMSampler(NoiselessOrder, DiscreteSampler):
    """``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)`` (eq. 16).
    ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's ancestral variance.
    Default spacing: ``linspace`` (starts at t = T - 1, ends clean).
    """

    ode_order = 1  # at eta = 0 (orders.NoiselessOrder)

    def __init__(self, *, steps: int = 50, eta: float = 0.0, spacing: str | None = None) -> None:
        super().__init__(steps=steps, spacing=spacing)
        if not (math.isfinite(eta) and eta >= 0):  # nan passed `eta < 0`: NaN images
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        self.eta = eta

    def step(self, s: DiscreteStep) -> Tensor:
        a, a_prev = s.alpha_bar, s.alpha_bar_prev
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        z = a_prev.sqrt() * s.x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * s.eps
        if self.eta > 0 and s.t_prev >= 0:
            z = z + sigma * s.noise()
        return z

    def __repr__(self) -> str:
        return f"DDIMSampler(steps={self.steps}, eta={self.eta}, spacing={self.spacing!r})"
