"""Image transforms applied at load time: channels, resize, crop, flip, to a [-1, 1] tensor.

The segmentation map (when there is one) goes through the same geometry with nearest-neighbour
resampling, so classes never blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageColor

CROPS = ("center", "random")


class RandomSource(Protocol):
    def random(self) -> float: ...
    def randint(self, a: int, b: int) -> int: ...


def parse_background(value: Any) -> tuple[int, int, int]:
    """``[r, g, b]``, a gray level, or a colour name/hex (``white``, ``#808080``)."""
    if isinstance(value, str):
        try:
            rgb = ImageColor.getrgb(value)[:3]
        except ValueError:
            raise ValueError(f"data.background: unknown colour {value!r}") from None
        return tuple(int(c) for c in rgb)
    if isinstance(value, int | float):
        return (int(value),) * 3
    values = [int(v) for v in value]
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"data.background must be 3 values in 0..255, got {value!r}")
    return tuple(values)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image (+ optional class map) -> ``C x S x S`` float32 in [-1, 1] (+ ``S x S`` int64).

    Transparent images (RGBA, LA, paletted with transparency) are composited on ``background``
    first; ``channels`` 1 gives luma (ITU-R 601), 3 gives RGB (gray replicated). The shorter side
    is scaled to ``image_size`` (bicubic; nearest for the map) unless it already is, then a
    ``center`` or ``random`` square crop and, with ``flip``, a horizontal flip with p = 1/2.
    """

    image_size: int
    channels: int = 3
    crop: str = "center"
    flip: bool = False
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels!r}")
        if self.crop not in CROPS:
            raise ValueError(f"unknown data.crop {self.crop!r}; expected one of {', '.join(CROPS)}")
        if int(self.image_size) < 1:
            raise ValueError(f"data.image_size must be positive, got {self.image_size!r}")

    def without_augmentation(self) -> ImageTransform:
        return ImageTransform(self.image_size, self.channels, "center", False, self.background)

    def to_channels(self, image: Image.Image) -> Image.Image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            canvas = Image.new("RGBA", image.size, (*self.background, 255))
            canvas.alpha_composite(image.convert("RGBA"))
            image = canvas
        target = "L" if self.channels == 1 else "RGB"
        return image if image.mode == target else image.convert(target)

    def __call__(
        self,
        image: Image.Image,
        segmentation: Image.Image | None = None,
        rng: RandomSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = self.to_channels(image)
        size = int(self.image_size)
        width, height = image.size
        # the shorter side scaled to `size`, then a size x size crop: done as one resize of the
        # crop's source region (PIL's `box`), so a 4000 x 3000 photo or a 3000 x 8 strip is
        # never scaled whole first (time, and memory: the strip would become 12000 x 32)
        scale = size / min(width, height)
        scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, scaled[0] - size), rng.randint(0, scaled[1] - size)
        else:
            left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
        if scaled != (width, height):
            sx, sy = width / scaled[0], height / scaled[1]
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
            if segmentation is not None:
                segmentation = segmentation.resize((size, size), Image.Resampling.NEAREST, box=box)
        elif (left, top, left + size, top + size) != (0, 0, width, height):
            box = (left, top, left + size, top + size)
            image = image.crop(box)
            if segmentation is not None:
                segmentation = segmentation.crop(box)
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if segmentation is not None:
                segmentation = segmentation.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        tensor = rearrange(torch.from_numpy(pixels.copy()), "h w c -> c h w").float() / 127.5 - 1.0
        seg = None
        if segmentation is not None:
            seg = torch.from_numpy(np.asarray(segmentation, dtype=np.int64).copy())
        return tensor, seg


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Invert the [-1, 1] scaling exactly for 8-bit data: ``(x + 1) * 127.5``, rounded."""
    return ((image + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
