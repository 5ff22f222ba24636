"""Pictures of conditions next to samples: what the trainer's grids and
``ldmkit sample --show-conditions`` draw. One tile per condition input, by its kind
(``Conditioner.input_kinds``): images as they are, class maps in a fixed palette, masks in
gray, prompts and class labels as text."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# background light gray, then well-separated colours (Sasha Trubetskoy's list)
PALETTE = torch.tensor([
    [235, 235, 235], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
    [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0],
], dtype=torch.float32) / 255.0  # fmt: skip


def make_grid(images: Tensor | Sequence[Tensor], nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """B×C×H×W (or a list of C×H×W) -> one C×H'×W' grid, ``nrow`` images per row, ``padding``
    pixels of ``pad_value`` between and around them, one channel repeated to three; a single
    image comes back as it is. The grid torchvision's ``make_grid`` makes (without its
    ``normalize``), built with two pads and a reshape instead of a loop, and without importing
    torchvision, which costs a process seconds (it imports ``torch._dynamo``)."""
    if not torch.is_tensor(images):
        images = torch.stack(list(images))
    if images.ndim == 2:
        images = images.unsqueeze(0)
    if images.ndim == 3:
        images = (images.expand(3, -1, -1) if images.shape[0] == 1 else images).unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"make_grid takes B×C×H×W images, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    n, channels, height, width = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    # each tile gets its top and left padding; the missing tiles of the last row are padding
    tiles = F.pad(images, (padding, 0, padding, 0), value=pad_value)
    if rows * cols > n:
        tiles = torch.cat([tiles, tiles.new_full((rows * cols - n, *tiles.shape[1:]), pad_value)])
    grid = tiles.reshape(rows, cols, channels, height + padding, width + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * (height + padding), cols * (width + padding))
    return F.pad(grid, (0, padding, 0, padding), value=pad_value)  # the right and bottom border


def save_image(images: Tensor, fp: Any, nrow: int = 8, padding: int = 2, pad_value: float = 0.0,
               format: str | None = None) -> None:
    """Images in [0, 1] (B×C×H×W, or one C×H×W grid) -> one 8-bit image file through PIL, as a
    :func:`make_grid` grid rounded the way torchvision's ``save_image`` rounds."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(array).save(fp, format=format)


def to_unit_rgb(images: Tensor) -> Tensor:
    """B×C×H×W in [-1, 1] (C = 1 or 3) -> B×3×H×W in [0, 1]."""
    images = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]


def colorize(ids: Tensor) -> Tensor:
    """B×H×W (or B×1×H×W) class ids -> B×3×H×W colours (ids beyond the palette wrap)."""
    ids = ids.detach().long().cpu()
    ids = ids[:, 0] if ids.ndim == 4 else ids
    return PALETTE[ids % len(PALETTE)].permute(0, 3, 1, 2).contiguous()


def number_values(value: Any) -> list[float]:
    """The values of a ``number`` input as they were written: a float32 tensor holds 0.9 as
    0.8999999761581421, which its 7 significant digits give back as 0.9."""
    values = value.tolist() if isinstance(value, Tensor) else list(value)
    return [float(f"{float(v):.7g}") for v in values]


def text_tiles(texts: Sequence[str], size: int) -> Tensor:
    """One white size×size tile per text, the text wrapped in black (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    per_line = max(4, size // 6)
    tiles = []
    for text in texts:
        tile = Image.new("RGB", (size, size), "white")
        lines = textwrap.wrap(str(text), width=per_line)[: max(1, size // 11)]
        ImageDraw.Draw(tile).multiline_text((2, 1), "\n".join(lines), fill="black", font=font, spacing=1)
        tiles.append(torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(tiles)


def _fit(tiles: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(tiles.shape[-2:]) == size:
        return tiles
    return F.interpolate(tiles, size=size, mode="nearest")


def condition_tiles(conditioner: Any, batch: Mapping[str, Any], size: tuple[int, int]) -> list[Tensor]:
    """One B×3×H×W tensor per input key of ``conditioner`` (H×W = ``size``), in
    ``input_keys`` order."""
    tiles = []
    for key in conditioner.input_keys:
        value = batch[key]
        kind = conditioner.input_kind(key)
        if kind == "image":
            tiles.append(_fit(to_unit_rgb(torch.as_tensor(value)), size))
        elif kind == "segmentation":
            tiles.append(_fit(colorize(torch.as_tensor(value)), size))
        elif kind == "mask":
            mask = torch.as_tensor(value).float().cpu()
            mask = mask[:, None] if mask.ndim == 3 else mask
            tiles.append(_fit(mask.expand(-1, 3, -1, -1), size))
        elif kind == "number":
            tiles.append(_fit(text_tiles([f"{v:g}" for v in number_values(value)], max(size)), size))
        else:  # class labels, prompts and token ids as text
            values = value.tolist() if isinstance(value, Tensor) else list(value)
            texts = [f"{key}={v}" if kind in ("class", "tokens") else v for v in values]
            tiles.append(_fit(text_tiles(texts, max(size)), size))
    return tiles


def samples_with_conditions(
    samples: Tensor,
    conditioner: Any,
    batch: Mapping[str, Any] | None,
    *,
    init_image: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Tiles for a grid with one row per sample: its condition tiles, the ``init_image`` and
    the ``mask`` it started from (img2img and inpainting with any model; B = 1 serves every
    row), then the sample. Returns (tiles N×3×H×W in [0, 1], tiles per row); no inputs at
    all: the samples alone."""
    images = to_unit_rgb(samples)
    n, size = images.shape[0], tuple(images.shape[-2:])
    columns = condition_tiles(conditioner, batch, size) if batch and conditioner.input_keys else []
    if init_image is not None:
        columns.append(_fit(to_unit_rgb(torch.as_tensor(init_image)).expand(n, -1, -1, -1), size))
    if mask is not None:
        mask = torch.as_tensor(mask).float().cpu()
        mask = mask.reshape(-1, 1, *mask.shape[-2:])
        columns.append(_fit(mask.expand(n, 3, -1, -1), size))
    if not columns:
        return images, 0
    columns.append(images)
    return torch.stack(columns, dim=1).flatten(0, 1), len(columns)
