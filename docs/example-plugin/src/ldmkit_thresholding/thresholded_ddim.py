"""Deterministic DDIM (Song et al. 2021, eq. 12) with dynamic thresholding of the x0
prediction (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep
Language Understanding", Sec. 2.3): per sample, ``s`` is the ``percentile`` quantile of
``|x0|`` but at least ``threshold``, and x0 becomes ``clamp(x0, -s, s) * threshold / s``.

It keeps predictions inside the data's range under strong guidance. ``threshold`` is that
range: 1 for data in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldmkit.diffusion import DiscreteSampler, DiscreteStep


class ThresholdedDDIMSampler(DiscreteSampler):
    """The base class runs the loop (spacing, masks, img2img, per-sample noise, progress);
    this class writes one step."""

    def __init__(
        self,
        *,
        steps: int = 50,
        percentile: float = 0.995,
        threshold: float = 1.0,
        spacing: str | None = None,
    ) -> None:
        super().__init__(steps=steps, spacing=spacing)
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {percentile}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.percentile, self.threshold = percentile, threshold

    def step(self, s: DiscreteStep) -> Tensor:
        bound = torch.quantile(s.x0.abs().flatten(1).float(), self.percentile, dim=1)
        bound = bound.clamp(min=self.threshold).to(s.x0.dtype).reshape(-1, *[1] * (s.x0.ndim - 1))
        x0 = s.x0.clamp(-bound, bound) * (self.threshold / bound)
        eps = (s.z - s.alpha_bar.sqrt() * x0) / (1 - s.alpha_bar).sqrt()  # consistent with x0
        return s.alpha_bar_prev.sqrt() * x0 + (1 - s.alpha_bar_prev).sqrt() * eps
