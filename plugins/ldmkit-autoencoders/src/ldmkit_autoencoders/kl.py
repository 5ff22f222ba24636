"""KL-regularized autoencoder (Rombach et al. 2022, Sec. 3.1 "KL-reg"): the encoder
predicts a diagonal Gaussian posterior q(z|x) = N(mu, sigma^2) and a small KL penalty
toward N(0, I) (weight 1e-6 in the paper) keeps the latent's scale in check."""

from __future__ import annotations

from typing import Any

import torch
from einops import reduce
from torch import Tensor

from ldmkit_autoencoders.engine import AutoencodingEngine, Regularizer, with_architecture_signature

ENCODE_MODES = ("sample", "mode")


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over C, H, W."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return reduce(kl, "b ... -> b", "sum")


class DiagonalGaussianRegularizer(Regularizer):
    """Splits the moments into mean and log-variance (clamped to [-30, 20] as in the
    original code, so exp() stays finite) and samples with the reparameterization trick."""

    moments_factor = 2
    # the paper's kl_weight=1e-6 is relative to a per-image *summed* reconstruction loss
    loss_reduction = "sum"

    def __init__(self, *, kl_weight: float = 1e-6, encode_mode: str = "sample"):
        super().__init__()
        if encode_mode not in ENCODE_MODES:
            raise ValueError(f"unknown encode_mode {encode_mode!r}; expected one of {ENCODE_MODES}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = float(kl_weight)
        self.encode_mode = encode_mode

    @staticmethod
    def split(h: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        mean, logvar = self.split(h)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        # at least float32: under CPU autocast the moments are bf16 and nothing upcasts exp / sum
        # (CUDA's autocast does), where exp(logvar) - 1 - logvar cancels near the prior;
        # a float64 model keeps float64
        wide = torch.promote_types(mean.dtype, torch.float32)
        kl = gaussian_kl(mean.to(wide), logvar.to(wide)).mean()
        logs = {"kl": kl.detach(), "posterior_std": torch.exp(0.5 * logvar).mean().detach()}
        return z, self.kl_weight * kl, logs

    def latent(self, h: Tensor) -> Tensor:
        mean, logvar = self.split(h)
        if self.encode_mode == "mode":
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


class KLAutoencoder(AutoencodingEngine):
    """First stage ``kl``. ``encode`` returns a posterior sample (``encode_mode="sample"``,
    what the paper's LDMs train on) or its mean (``"mode"``); the training ``forward``
    always samples. The regularization loss is ``kl_weight * KL`` (summed over the
    latent, averaged over the batch)."""

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        kl_weight: float = 1e-6,
        encode_mode: str = "sample",
        **arch: Any,
    ) -> None:
        """``arch``: the encoder/decoder shape (:class:`~ldmkit_autoencoders.engine.Architecture`)."""
        super().__init__(
            regularizer=DiagonalGaussianRegularizer(kl_weight=kl_weight, encode_mode=encode_mode),
            latent_channels=latent_channels,
            **arch,
        )

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logvar)`` of q(z|x)."""
        return self.regularizer.split(self.moments(x))


with_architecture_signature(KLAutoencoder)
