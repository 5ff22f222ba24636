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
from ldmkit_samplers.common import check_mask, fresh_noise, paste_known, step_pairs


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
        check_mask(mask, known, noise)
        z = noise
        for i, (t, t_prev) in enumerate(step_pairs(schedule, steps or self.steps)):
            tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            x0 = schedule.predict_x0(z, tt, denoise(z, tt))
            a, a_prev = schedule.alpha_bar_at(t, z), schedule.alpha_bar_at(t_prev, z)
            beta = 1 - a / a_prev
            mean = (a_prev.sqrt() * beta / (1 - a)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a)) * z
            if t_prev >= 0:
                variance = beta * (1 - a_prev) / (1 - a)
                z = mean + variance.sqrt() * fresh_noise(z, generator)
            else:
                z = mean
            z = paste_known(z, t_prev, schedule, mask, known, generator)
            if callback is not None:
                callback({"i": i, "t": t, "z": z, "x0": x0})
        return z
