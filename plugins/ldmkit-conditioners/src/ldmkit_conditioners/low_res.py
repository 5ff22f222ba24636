"""Low-resolution image conditioning for super-resolution (the paper's LDM-SR, Sec. 4.4):
the low-resolution image, brought to the latent grid, is concatenated to z_t."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.errors import ConfigError
from ldmkit.interfaces import Conditioner, ConditionValueError
from ldmkit_conditioners.rescaler import check_image_range, not_bound

METHODS = ("bicubic", "bilinear")


class LowResConditioner(Conditioner):
    """``batch[input_key]`` (B×channels×h×w in [-1, 1], the image to upscale ``factor``
    times) -> ``{"concat": B×channels×(h·factor/f)×(w·factor/f)}``, f from the bound first
    stage; with the paper's setup (f = factor = 4) the low-res image already has the latent's
    size and passes through unchanged, otherwise it is resized with ``method``.

    Training data holds only the full-resolution ``source_key`` image;
    :meth:`training_inputs` derives the low-res one from it by antialiased bicubic
    downsampling by ``factor`` (the paper's "bicubic degradation", as in SR3; the
    antialias filter matches PIL's bicubic resize, so users who shrink their images with
    PIL see the degradation the model was trained on). The null condition is all zeros
    (a flat mid-gray image).
    """

    def __init__(
        self,
        *,
        factor: int = 4,
        channels: int = 3,
        method: str = "bicubic",
        input_key: str = "lowres",
        source_key: str = "image",
    ) -> None:
        super().__init__()
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        if method not in METHODS:
            raise ValueError(f"unknown interpolation method {method!r}; expected one of {METHODS}")
        self.factor, self.channels, self.method = int(factor), int(channels), method
        self.input_key, self.source_key = input_key, source_key
        self.input_keys = (input_key,)
        self.input_kinds = {input_key: "image"}
        self.concat_channels = self.channels
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self._first_stage_f: int | None = None

    @property
    def data_keys(self) -> tuple[str, ...]:
        return (self.source_key,)

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        channels = getattr(first_stage, "image_channels", None)
        if isinstance(channels, int) and channels != self.channels:  # every sample would fail
            raise ConfigError(
                f"conditioner.channels={self.channels}, but the first stage takes {channels}-channel images: "
                f"the low-res input is the image to upscale, so set conditioner.channels={channels}"
            )
        self._first_stage_f = int(first_stage.downsample_factor)

    def _images(self, batch: Mapping[str, Any], key: str) -> Tensor:
        x = torch.as_tensor(self.read(batch, key))
        if x.ndim != 4 or x.shape[1] != self.channels or not x.is_floating_point():
            raise ConditionValueError(
                f"low_res: batch[{key!r}] must be float images B×{self.channels}×H×W in [-1, 1], "
                f"got shape {tuple(x.shape)} ({x.dtype})"
                + (f": conditioner.channels={self.channels} does not match its {x.shape[1]} channels"
                   if x.ndim == 4 and x.shape[1] != self.channels else "")
            )
        return check_image_range(x, key, "low_res")

    def degrade(self, image: Tensor) -> Tensor:
        """The training degradation: antialiased bicubic downsampling by ``factor``."""
        h, w = image.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ConditionValueError(
                f"low_res: image size {h}x{w} of batch[{self.source_key!r}] is not divisible by "
                f"factor={self.factor}"
            )
        size = (h // self.factor, w // self.factor)
        low = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
        return low.clamp(-1.0, 1.0)  # bicubic overshoots at edges

    def training_inputs(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> Mapping[str, Any]:
        if self.input_key in batch:
            return dict(batch)
        # deterministic degradation: ``generator`` is not needed
        return {**batch, self.input_key: self.degrade(self._images(batch, self.source_key))}

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """The latent grid for a h×w low-res image: ``h * factor / f``."""
        f = self._first_stage_f
        if f is None:
            raise not_bound(self)
        if (h * self.factor) % f or (w * self.factor) % f:
            raise ConditionValueError(
                f"low_res: a {h}x{w} batch[{self.input_key!r}] upscaled by factor={self.factor} "
                f"is not divisible by the first stage's f={f}"
            )
        return h * self.factor // f, w * self.factor // f

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        low = self._images(batch, self.input_key)
        size = self.latent_size(*low.shape[-2:])
        low = low.to(device=self._anchor.device, dtype=self._anchor.dtype)
        if tuple(low.shape[-2:]) != size:
            shrink = size[0] < low.shape[-2]
            low = F.interpolate(low, size=size, mode=self.method, align_corners=False, antialias=shrink)
        return {"concat": low}
