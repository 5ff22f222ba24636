"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, Algorithm 2, on a respaced schedule.

With fewer steps than the schedule's T the chain runs on the sub-sequence of timesteps
(Nichol & Dhariwal 2021, Sec. 4): ``beta_i = 1 - a_i / a_prev`` for consecutive
retained steps.
"""

from __future__ import annotations

from torch import Tensor

from ldmkit.diffusion import DiscreteSampler, DiscreteStep


class DDPMSampler(DiscreteSampler):
    """Ancestral sampling from the posterior ``q(x_prev | x_t, x0_hat)``.

    Mean ``(sqrt(a_prev) beta / (1 - a)) x0 + (sqrt(1 - beta) (1 - a_prev) / (1 - a)) x_t``
    and variance ``beta (1 - a_prev) / (1 - a)`` (DDPM eq. 6-7). Default: all T steps
    (``linspace`` spacing, which with S = T visits every timestep).
    """

    def __init__(self, *, steps: int = 1000, spacing: str | None = None) -> None:
        super().__init__(steps=steps, spacing=spacing)

    def step(self, s: DiscreteStep) -> Tensor:
        a, a_prev = s.alpha_bar, s.alpha_bar_prev
        beta = 1 - a / a_prev
        mean = (a_prev.sqrt() * beta / (1 - a)) * s.x0 + (
            (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
        ) * s.z
        if s.t_prev < 0:
            return mean
        variance = beta * (1 - a_prev) / (1 - a)
        return mean + variance.sqrt() * s.noise()
