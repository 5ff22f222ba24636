"""Inpainting masks: the one convention and the one rule that brings a mask to the latent grid.

The convention, the same for the samplers, ``Pipeline.sample``, the ``inpaint`` conditioner
and ``ldmkit sample --mask``: a mask is **1 where the image is generated (repainted) and 0
where it is kept**; in a PNG, white is generated and black is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmkit.errors import LdmkitError


class MaskError(LdmkitError, ValueError):
    """A mask that does not fit its image (the message names the argument)."""


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask B×1×H×W -> the latent grid B×1×H/f×W/f.

    A latent cell is generated as soon as one of its f×f pixels is (max-pooling), so no cell
    marked "keep" covers a pixel that is to be generated; a soft mask keeps each cell's
    largest value.
    """
    f = int(factor)
    h, w = mask.shape[-2:]
    if h % f or w % f:
        raise MaskError(
            f"a {h}x{w} mask does not tile into the first stage's {f}x{f} latent cells "
            f"(downsample factor f={f})"
        )
    return F.max_pool2d(mask, kernel_size=f, stride=f) if f > 1 else mask


def pixel_mask(
    mask: Tensor,
    image: Tensor,
    *,
    num_samples: int | None = None,
    name: str = "mask",
    image_name: str = "image",
) -> Tensor:
    """``mask`` as B×1×H×W float on ``image``'s device, checked against ``image`` (B×C×H×W).

    Accepts H×W, B×H×W and B×1×H×W with B = 1 (one mask for every image), the image's B or
    ``num_samples``; values must lie in [0, 1] (1 = generate, 0 = keep).
    """
    mask = torch.as_tensor(mask)
    given = tuple(mask.shape)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    b, _, h, w = image.shape
    batch_sizes = sorted({1, b, num_samples or b})
    if (
        mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[0] not in batch_sizes
        or mask.shape[-2:] != (h, w)
    ):
        raise MaskError(
            f"{name} has shape {given}, but {image_name} has shape {tuple(image.shape)}: the mask "
            f"must be H×W, B×H×W or B×1×H×W with the image's H×W = {h}x{w}"
            + (f" (and B in {batch_sizes})" if len(batch_sizes) > 1 else "")
        )
    mask = mask.to(device=image.device, dtype=torch.float32)
    lo, hi = float(mask.min()), float(mask.max())
    if not (lo >= 0 and hi <= 1):  # NaN fails both
        raise MaskError(
            f"{name} values must be in [0, 1] (1 = generate, 0 = keep), got [{lo:g}, {hi:g}]"
        )
    return mask


__all__ = ["MaskError", "latent_mask", "pixel_mask"]
