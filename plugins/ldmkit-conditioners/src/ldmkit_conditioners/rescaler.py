"""What the spatial conditioners (``semantic_map``, ``low_res``, ``inpaint``) share:
``SpatialRescaler``, which resizes a spatial condition down to the latent grid (the paper's
``ldm.modules.encoders.modules.SpatialRescaler``, used by its semantic-synthesis models),
their errors, and the naming of a bad sample in a message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.errors import LdmkitError
from ldmkit.interfaces import ConditionValueError  # noqa: F401 - its home before ldmkit.interfaces

METHODS = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area")


class SpatialRescaler(nn.Module):
    """``n_stages`` successive ``F.interpolate(x, scale_factor=multiplier, mode=method)``,
    then an optional 1×1 convolution ``channel_mapper`` (``in_channels -> out_channels``).

    With the default ``multiplier=0.5`` each stage floors the size by two, so a H×W input
    comes out ``H // 2**n_stages × W // 2**n_stages`` (for sizes divisible by 2**n_stages)
    and ``n_stages = log2(f)`` brings an image-sized map to an f-downsampled latent.
    ``method`` is ``F.interpolate``'s mode: ``linear`` expects 3-d input (B×C×L) and
    ``trilinear`` 5-d, like the paper's module; the others work on B×C×H×W.
    The mapper keeps the paper's parameter name so converted weights load by name.
    """

    def __init__(
        self,
        *,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown interpolation method {method!r}; expected one of {METHODS}")
        if int(n_stages) != n_stages or n_stages < 0:
            raise ValueError(f"n_stages must be an integer >= 0, got {n_stages!r}")
        if not multiplier > 0:
            raise ValueError(f"multiplier must be > 0, got {multiplier!r}")
        self.n_stages, self.method, self.multiplier = int(n_stages), method, float(multiplier)
        self.in_channels = int(in_channels)
        self.out_channels = self.in_channels if out_channels is None else int(out_channels)
        if out_channels is not None:
            self.channel_mapper = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=bias)
        else:
            self.channel_mapper = None

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.channel_mapper is not None:
            x = self.channel_mapper(x)
        return x

    def extra_repr(self) -> str:
        return f"n_stages={self.n_stages}, method={self.method!r}, multiplier={self.multiplier}"


# -- errors ----------------------------------------------------------------------------------


class FirstStageNotBoundError(LdmkitError, RuntimeError):
    """A conditioner that needs the first stage was used before ``bind_first_stage``."""


def check_image_range(x: Tensor, key: str, who: str) -> Tensor:
    """``x`` when its values lie in [-1, 1] (the images the conditioner trained on); else an
    error naming ``batch[key]`` and the range found (NaN fails too)."""
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -1 - 1e-4 and hi <= 1 + 1e-4):
        raise ConditionValueError(
            f"{who}: batch[{key!r}] values must be in [-1, 1], got [{lo:g}, {hi:g}] (images in [0, 1] map to "
            "[-1, 1] as x * 2 - 1)"
        )
    return x


def not_bound(conditioner: nn.Module) -> FirstStageNotBoundError:
    name = type(conditioner).__name__
    return FirstStageNotBoundError(
        f"conditioner {name} needs the pipeline's first stage (its f / its encoder), but none "
        f"is bound: call {name}.bind_first_stage(first_stage) first (ldmkit.compose does)"
    )


def describe_sample(batch: Mapping[str, Any], key: str, index: int) -> str:
    """``"sample 3 (key 'a/0003', file 'maps/3.png')"``: where a bad value came from.

    ``batch["__key__"]`` holds the data loader's per-sample keys; ``batch["__source__"][key]``
    the file (or per-sample files) the CLI read ``key`` from.
    """
    parts = []
    sample_keys = batch.get("__key__")
    if isinstance(sample_keys, str):
        parts.append(f"key {sample_keys!r}")
    elif isinstance(sample_keys, list | tuple) and index < len(sample_keys):
        parts.append(f"key {sample_keys[index]!r}")
    sources = batch.get("__source__")
    source = sources.get(key) if isinstance(sources, Mapping) else None
    if isinstance(source, list | tuple):
        source = source[index] if index < len(source) else None
    if source is not None:
        parts.append(f"file {str(source)!r}")
    return f"sample {index}" + (f" ({', '.join(parts)})" if parts else "")


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights live (CPU for one without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
