"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the denoise callable."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


class ClassifierFreeGuidance:
    """``eps = eps(z, t, null) + scale * (eps(z, t, c) - eps(z, t, null))``.

    Both branches run in one batched call. ``scale = 1`` is plain conditional
    sampling and skips the unconditional branch.
    """

    def __init__(
        self,
        model: ModelFn,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor],
        scale: float,
    ) -> None:
        if isinstance(scale, int | float) and (not math.isfinite(scale) or scale < 0):
            raise ValueError(
                f"guidance_scale must be a number >= 0 (1: no guidance, 0: unconditional), got {scale}"
            )
        if set(cond) != set(uncond):
            raise ValueError(
                f"conditional keys {sorted(cond)} differ from unconditional keys {sorted(uncond)}"
            )
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, scale
        # [uncond; cond] once per call, not once per step
        self.both = {k: torch.cat([uncond[k], cond[k]]) for k in cond} if scale != 1.0 and cond else None

    def __call__(self, z_t: Tensor, t: Tensor) -> Tensor:
        if self.both is None:
            return self.model(z_t, t, self.cond)
        eps_u, eps_c = self.model(torch.cat([z_t, z_t]), torch.cat([t, t]), self.both).chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)
