"""The identity first stage (f = 1): pixel-space diffusion baselines run through it."""

from __future__ import annotations

from torch import Tensor

from ldmkit.interfaces import FirstStage


class IdentityFirstStage(FirstStage):
    """``encode`` and ``decode`` return their input: the "latent" is the image itself.

    The paper's pixel-based baselines (LDM-1, i.e. f = 1) are latent diffusion with this
    first stage. ``latent_channels`` must equal ``channels``; it exists as an argument
    so that configs can state it like every other first stage does.
    """

    def __init__(self, *, channels: int = 3, latent_channels: int | None = None) -> None:
        super().__init__()
        if latent_channels is not None and latent_channels != channels:
            raise ValueError(
                f"identity first stage: latent_channels={latent_channels} must equal "
                f"channels={channels} (the latent is the image)"
            )
        self.image_channels = channels
        self.latent_channels = channels
        self.downsample_factor = 1

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z
