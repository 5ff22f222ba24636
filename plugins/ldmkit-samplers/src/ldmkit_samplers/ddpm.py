"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, Algorithm 2, on a respaced schedule.

With fewer steps than the schedule's T the chain runs on the sub-sequence of timesteps
(Nichol & Dhariwal 2021, Sec. 4): ``beta_i = 1 - a_i / a_prev`` for consecutive
retained steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ldmkit.interfaces import Callback, DenoiseFn, Sampler
from ldmkit_samplers.common import fresh_noise, run_chain


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior ``q(x_prev | x_t, x0_hat)``.

    Mean ``(sqrt(a_prev) beta / (1 - a)) x0 + (sqrt(1 - beta) (1 - a_prev) / (1 - a)) x_t``
    and variance ``beta (1 - a_prev) / (1 - a)`` (DDPM eq. 6-7).
    """

    supports_mask = True

    def __init__(self, *, steps: int = 1000) -> None:
        super().__init__(steps=steps)

    def sample(
        self,
        denoise: DenoiseFn,
        schedule: Any,
        noise: Tensor,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        mask: Tensor | None = None,
        known: Tensor | None = None,
    ) -> Tensor:
        def step(z, eps, x0, a, a_prev, t_prev):
            beta = 1 - a / a_prev
            mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * z
            if t_prev < 0:
                return mean
            variance = beta * (1 - a_prev) / (1 - a)
            return mean + variance.sqrt() * fresh_noise(z, generator)

        return run_chain(step, denoise, schedule, noise, steps or self.steps, generator=generator,
                         callback=callback, mask=mask, known=known)
