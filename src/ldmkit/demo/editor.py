"""The image editor's value (an uploaded image with painted strokes) as two PNG files: the
image, and a mask that is white where the user painted (the region to generate)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldmkit.demo.form import DemoInputError


def editor_files(
    value: Mapping[str, Any] | None, directory: Path, stem: str, *, name: str | None = None
) -> tuple[Path | None, Path | None]:
    """``(image PNG, mask PNG)`` from an editor value ``{"background", "layers", "composite"}``
    (PIL images or arrays); the mask is None when nothing was painted, both are None when no
    image was uploaded. The mask has the image's size: strokes outside it are cut off. Files
    are ``<stem>.png`` and ``<stem>_mask.png``; messages name the input ``name`` (or ``stem``)."""
    if not value:
        return None, None
    background = _pil(value.get("background"))
    layers = [_pil(layer) for layer in value.get("layers") or []]
    painted = [layer for layer in layers if layer is not None and _alpha(layer).any()]
    if background is None or not _has_content(background):
        if painted:
            raise DemoInputError(
                f"{name or stem}: the strokes need an image under them: upload the image first"
            )
        return None, None
    directory.mkdir(parents=True, exist_ok=True)
    image_path = directory / f"{stem}.png"
    _flatten(background).save(image_path)
    if not painted:
        return image_path, None
    mask = np.zeros((background.height, background.width), dtype=bool)
    for layer in painted:
        alpha = _alpha(layer)
        h, w = min(alpha.shape[0], mask.shape[0]), min(alpha.shape[1], mask.shape[1])
        mask[:h, :w] |= alpha[:h, :w]
    mask_path = directory / f"{stem}_mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path)
    return image_path, mask_path


def _pil(value: Any) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        return Image.open(value)
    return Image.fromarray(np.asarray(value))


def _alpha(layer: Image.Image) -> np.ndarray:
    """Where a stroke layer is painted (alpha > 0; an opaque layer counts where not black)."""
    if layer.mode in ("RGBA", "LA", "PA"):
        return np.asarray(layer.getchannel("A")) > 0
    return np.asarray(layer.convert("L")) > 0


def _has_content(image: Image.Image) -> bool:
    """An empty canvas arrives as a fully transparent background."""
    return image.mode not in ("RGBA", "LA", "PA") or bool(
        (np.asarray(image.getchannel("A")) > 0).any()
    )


def _flatten(image: Image.Image) -> Image.Image:
    """Transparency composited over white (the editor's canvas colour)."""
    if image.mode in ("RGBA", "LA", "PA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


# -- drawing a class map -------------------------------------------------------------------------

# 22 colours told apart at a glance (Sasha Trubetskoy's list), black first: class i is drawn in
# PALETTE[i], so a drawn map has at most this many classes
PALETTE = (
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#808080",
    "#ffffff",
)


def palette(num_classes: int) -> list[str] | None:
    """The brush colours of classes ``0..num_classes-1``; None when there are too many."""
    return list(PALETTE[:num_classes]) if 0 < num_classes <= len(PALETTE) else None


def drawn_ids(value: Mapping[str, Any] | None, num_classes: int) -> np.ndarray | None:
    """A drawing's class ids (H×W uint8): each pixel the class of the nearest palette colour
    (the brush's soft edges fall to one side); transparent pixels are class 0."""
    if not value:
        return None
    image = _pil(value.get("composite"))
    if image is None:
        image = _pil(value.get("background"))
        if image is None:
            return None
        image = image.convert("RGBA")
        for layer in value.get("layers") or []:
            layer = _pil(layer)
            if layer is not None and layer.size == image.size:
                image = Image.alpha_composite(image, layer.convert("RGBA"))
    rgba = np.asarray(image.convert("RGBA"), dtype=np.int32)
    colours = np.array([_rgb(c) for c in PALETTE[:num_classes]], dtype=np.int32)
    distance = ((rgba[..., None, :3] - colours[None, None]) ** 2).sum(-1)
    ids = distance.argmin(-1).astype(np.uint8)
    ids[rgba[..., 3] == 0] = 0
    return ids


def drawing_file(
    value: Mapping[str, Any] | None, num_classes: int, directory: Path, stem: str
) -> Path | None:
    """:func:`drawn_ids` written as a one-channel PNG of class ids (what an upload would be)."""
    ids = drawn_ids(value, num_classes)
    if ids is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.png"
    Image.fromarray(ids, mode="L").save(path)
    return path


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
