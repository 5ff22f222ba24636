"""The ``FirstStage`` interface: perceptual compression (Sec. 3.1 of Rombach et al. 2022).

A first stage maps an image ``x`` (B×C×H×W in [-1, 1]) to the latent ``z``
(B×c×H/f×W/f) the diffusion model works in, and back. ``f = downsample_factor``.

A complete minimal plugin (a first stage that average-pools by 2)::

    import torch.nn.functional as F
    import ldmkit
    from ldmkit.interfaces import FirstStage

    class Pool2(FirstStage):
        def __init__(self, *, latent_channels: int = 3):
            super().__init__()
            self.latent_channels = latent_channels
            self.downsample_factor = 2
            self.image_channels = latent_channels

        def encode(self, x):
            return F.avg_pool2d(x, 2)

        def decode(self, z):
            return F.interpolate(z, scale_factor=2, mode="nearest")

    @ldmkit.hookimpl
    def ldmkit_register_first_stages(register):
        register("pool2", Pool2)

Register the module under the ``ldmkit`` entry-point group of your distribution
(see docs/plugins.md) and ``first_stage=pool2`` selects it once you ship a config
``first_stage/pool2.yaml`` containing ``name: pool2`` and ``latent_channels: 3``.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.interfaces.component import Component


class FirstStage(nn.Module, Component, abc.ABC):
    """Autoencoder used as the first stage of a latent diffusion model.

    Implementations set, in ``__init__``:

    * ``latent_channels`` (int) — channels ``c`` of the latent ``encode`` returns;
    * ``downsample_factor`` (int) — ``f = H / h``, a power of two;
    * ``image_channels`` (int, default 3) — channels of the images it accepts.

    For VQ-reg models ``encode`` returns the *pre-quantization* latent and
    ``decode`` quantizes first: the quantizer is absorbed into the decoder.
    """

    latent_channels: int
    downsample_factor: int
    image_channels: int = 3

    @abc.abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Images B×C×H×W in [-1, 1] -> latents B×c×H/f×W/f."""

    @abc.abstractmethod
    def decode(self, z: Tensor) -> Tensor:
        """Latents B×c×h×w -> images B×C×h·f×w·f in (roughly) [-1, 1]."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Training pass: ``(reconstruction, regularization_loss, logs)``.

        The default has no regularizer; KL-reg and VQ-reg models override this
        to return their KL penalty or codebook + commitment loss.
        """
        rec = self.decode(self.encode(x))
        return rec, torch.zeros((), device=x.device, dtype=x.dtype), {}

    def last_layer(self) -> Tensor | None:
        """Weight of the decoder's last layer, for the adaptive GAN weight (None: no GAN)."""
        return None

    def latent_shape(self, image_height: int, image_width: int) -> tuple[int, int, int]:
        """``(c, h, w)`` of the latent for an image of the given size."""
        f = self.downsample_factor
        if image_height % f or image_width % f:
            raise ValueError(
                f"image size {image_height}x{image_width} is not divisible by the first "
                f"stage's downsample factor f={f}"
            )
        return self.latent_channels, image_height // f, image_width // f
