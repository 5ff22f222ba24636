"""The ``Denoiser`` interface: eps_theta(z_t, t, tau(y)).

A denoiser predicts, from the noisy latent ``z_t`` (B×c×h×w) at integer timesteps
``t`` (LongTensor of shape B) and a condition dict (see ``Conditioner``), one of
``eps`` (the noise), ``x0`` (the clean latent) or ``v`` (Salimans & Ho 2022);
the class attribute ``prediction`` says which. The core converts between them.

It declares ``in_channels`` (latent channels + concat channels), ``out_channels``,
``context_dim`` (the ``crossattn`` dim it attends to, None if it takes none) and
``vector_dim`` (the ``vector`` dim, None if none). Configs may set any of these to
``auto``; composition fills them from the first stage and the conditioner.

A complete minimal plugin (a 3x3 convolution plus a bias learned from t; it reads only the
``concat`` condition)::

    from torch import nn
    import ldmkit
    from ldmkit.interfaces import Denoiser

    class ConvDenoiser(Denoiser):
        prediction = "eps"

        def __init__(self, *, in_channels: int = 4, out_channels: int = 4,
                     context_dim: int | None = None, vector_dim: int | None = None):
            super().__init__()
            self.in_channels, self.out_channels = in_channels, out_channels
            self.context_dim, self.vector_dim = context_dim, vector_dim
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.time = nn.Linear(1, out_channels)  # a denoiser must depend on t

        def forward(self, z_t, t, cond):
            bias = self.time(t.float()[:, None] / 1000)[:, :, None, None]
            return self.conv(self.concat_condition(z_t, cond)) + bias

    @ldmkit.hookimpl
    def ldmkit_register_denoisers(register):
        register("conv", ConvDenoiser)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ldmkit.interfaces.component import Component

PREDICTIONS = ("eps", "x0", "v")


class Denoiser(nn.Module, Component, abc.ABC):
    """Time- and condition-dependent network of the reverse process."""

    prediction: str = "eps"
    # sampling in bf16/fp16 runs on a copy of the weights in that precision (under autocast);
    # False: autocast over the float32 weights (for a forward that cannot take low-precision
    # weights; one that raises a dtype error falls back by itself, with a warning)
    supports_low_precision_weights: bool = True
    in_channels: int
    out_channels: int
    context_dim: int | None = None
    vector_dim: int | None = None

    @abc.abstractmethod
    def forward(self, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Predict ``self.prediction`` for ``z_t`` (B×c×h×w) at timesteps ``t`` (B,)."""

    @staticmethod
    def concat_condition(z_t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """``z_t`` with ``cond["concat"]`` (if any) appended along channels."""
        extra = cond.get("concat")
        if extra is None:
            return z_t
        if extra.shape[0] != z_t.shape[0] or extra.shape[-2:] != z_t.shape[-2:]:
            raise ValueError(
                f"concat condition of shape {tuple(extra.shape)} does not match the "
                f"latent of shape {tuple(z_t.shape)} (batch and spatial size must agree)"
            )
        return torch.cat([z_t, extra.to(z_t.dtype)], dim=1)
