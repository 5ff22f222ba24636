"""DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ldmkit.interfaces import Callback, DenoiseFn, Sampler
from ldmkit_samplers.common import fresh_noise, run_chain


class DDIMSampler(Sampler):
    """DDIM over ``steps`` evenly spaced timesteps.

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)`` (eq. 16).
    ``eta = 0`` is deterministic; ``eta = 1`` matches DDPM's ancestral variance.
    """

    supports_mask = True

    def __init__(self, *, steps: int = 50, eta: float = 0.0) -> None:
        super().__init__(steps=steps)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

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
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
            z = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if self.eta > 0 and t_prev >= 0:
                z = z + sigma * fresh_noise(z, generator)
            return z

        return run_chain(step, denoise, schedule, noise, steps or self.steps, generator=generator,
                         callback=callback, mask=mask, known=known)

    def __repr__(self) -> str:
        return f"DDIMSampler(steps={self.steps}, eta={self.eta})"
