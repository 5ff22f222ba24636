"""The training objective of the latent diffusion model (Rombach et al. 2022, eq. 2):
``L = E_{z0, c, eps, t} || target - f_theta(z_t, t, tau(y)) ||^2`` with the target set by
the denoiser's parameterization (eps, x0 or v)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.interfaces import PREDICTIONS

LOSS_TYPES = ("l2", "l1")
# one generator for the batch, one per sample (ldmkit.training.rng.sample_generators), or None
# (the global generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


class DiffusionObjective(nn.Module):
    """Per-batch denoising loss.

    :param prediction: what the denoiser predicts: ``eps`` (the paper), ``x0`` or ``v``.
    :param loss_type: ``l2`` (the paper) or ``l1``.
    :param learn_logvar: learn a log-variance per timestep and use
        ``loss / exp(logvar_t) + logvar_t`` (CompVis ``LatentDiffusion.learn_logvar``).
    :param min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): the loss of step t is
        weighted by ``min(SNR_t, gamma)`` expressed in the prediction's units; None = off.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction: str = "eps",
        loss_type: str = "l2",
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        min_snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if not math.isfinite(logvar_init):  # else every loss is NaN, from the first step
            raise ValueError(f"logvar_init must be a finite number, got {logvar_init}")
        self.schedule = schedule
        self.prediction, self.loss_type, self.min_snr_gamma = prediction, loss_type, min_snr_gamma
        self.learn_logvar = learn_logvar
        logvar = torch.full((schedule.timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

    def target(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return z0
        return self.schedule.v_target(z0, t, noise)

    def snr_weight(self, t: Tensor, like: Tensor) -> Tensor:
        """Min-SNR-gamma weight per sample (1 when off)."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape[0], device=like.device, dtype=like.dtype)
        a = self.schedule.alpha_bar(t, like).flatten()
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "x0":
            return clipped
        return clipped / (snr + 1)

    def sample_timesteps(self, batch: int, device: torch.device, generator: Generators = None) -> Tensor:
        if isinstance(generator, Sequence):  # one per sample
            draws = [torch.randint(0, self.schedule.timesteps, (1,), generator=g) for g in generator]
            return torch.cat(draws).to(device)
        return torch.randint(0, self.schedule.timesteps, (batch,), generator=generator).to(device)

    def sample_noise(self, z0: Tensor, generator: Generators = None) -> Tensor:
        return self.draw_noise(z0.shape, z0.dtype, z0.device, generator)

    def draw_noise(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: Generators = None) -> Tensor:
        if isinstance(generator, Sequence):  # one per sample
            return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator]).to(device)
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def draw(
        self, shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        """Timesteps and noise for latents of ``shape``, drawn as :meth:`forward` draws them
        (one generator per sample: each draws its t, then its eps)."""
        t = self.sample_timesteps(shape[0], device, generator)
        return t, self.draw_noise(shape, dtype, device, generator)

    def forward(
        self,
        denoiser: nn.Module,
        z0: Tensor,
        cond: Mapping[str, Tensor],
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: Generators = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Draw t and eps (unless given), noise z0 and return ``(loss, logs)``. ``generator``:
        one for the batch, or one per sample (each draws its t, then its eps)."""
        if t is None or noise is None:
            drawn_t, drawn_noise = self.draw(z0.shape, z0.dtype, z0.device, generator)
            t, noise = t if t is not None else drawn_t, noise if noise is not None else drawn_noise
        z_t = self.schedule.q_sample(z0, t, noise)
        output = denoiser(z_t, t, cond)
        error = output.float() - self.target(z0, t, noise).float()
        per_element = error.square() if self.loss_type == "l2" else error.abs()
        per_sample = per_element.flatten(1).mean(1)
        simple = per_sample.mean()
        weighted = per_sample * self.snr_weight(t, per_sample)
        logvar_t = self.logvar.to(z0.device)[t]
        loss = (weighted / logvar_t.exp() + logvar_t).mean()
        logs = {"loss_simple": simple.detach(), "loss": loss.detach()}
        if self.learn_logvar:
            logs["logvar"] = logvar_t.mean().detach()
        return loss, logs


def scale_factor_from_latents(latents: Tensor) -> float:
    """``1 / std`` of a batch of latents: the paper's ``scale_by_std`` rescaling, which
    gives the diffusion model latents of unit variance."""
    std = latents.detach().float().flatten().std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"cannot set the latent scale factor from latents with std {float(std)}")
    return float(1.0 / std)
