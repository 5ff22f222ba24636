"""Inpainting conditioning (the paper's inpainting LDM, Sec. 4.5): the latent of the masked
image and the mask on the latent grid, concatenated to z_t (c + 1 channels)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit import masks
from ldmkit.interfaces import Conditioner, ConditionValueError
from ldmkit_conditioners.rescaler import check_image_range, module_device, not_bound

# how the condition is built: ldmkit's own, or as the paper's inpainting model was trained
STYLES = ("ldmkit", "paper")


def encode_mean(first_stage: nn.Module, images: Tensor) -> Tensor:
    """The latent of ``images`` without noise: a KL first stage's posterior mean (its
    ``posterior``), as the paper's ``get_learned_conditioning`` takes ``c.mode()``; else
    ``encode``. A posterior sample would draw from the global RNG, so the same seed would give
    other images each call, and a sample would depend on the batch it is drawn in."""
    posterior = getattr(first_stage, "posterior", None)
    return posterior(images)[0] if callable(posterior) else first_stage.encode(images)


class InpaintConditioner(Conditioner):
    """``batch[image_key]`` (B×C×H×W in [-1, 1]) and ``batch[mask_key]`` (B×1×H×W or B×H×W,
    **1 = region to generate, 0 = keep**, the convention of ldmkit's samplers) ->
    ``{"concat": [first_stage.encode(masked image), mask on the latent grid]}``,
    B×(c+1)×H/f×W/f.

    * ``style="ldmkit"`` (the default, what ldmkit-trained models learnt): the fill region
      of the image is set to 0 (mid-gray) before encoding, so the condition never sees the
      pixels it is asked to generate; the mask channel is 0/1, brought to the latent grid by
      max-pooling over each f×f cell: a latent cell is "fill" as soon as one of its pixels
      is, so no latent marked "keep" covers a pixel to be generated.
    * ``style="paper"``: the condition the paper's inpainting model (``inpainting_big``) was
      trained on, as CompVis/latent-diffusion's ``scripts/inpaint.py`` builds it: the fill
      region set to -1 (black), the mask channel -1 (keep) / +1 (fill), resized to the
      latent grid by ``F.interpolate`` (nearest: each cell takes its top-left pixel).
      Imported paper checkpoints select it (:mod:`ldmkit.interop.compvis`).
    * Neither style multiplies the latent by the pipeline's ``scale_factor`` (the paper's
      script concatenates ``first_stage.encode`` as it comes). A KL first stage gives its
      posterior mean (:func:`encode_mean`), whatever its ``encode_mode``: the condition draws
      no noise.
    * Masks must hold exactly 0 and 1 (bool works too); soft masks are refused, not
      thresholded: threshold them yourself (``mask > 0.5``) if that is what you mean.
    * The first stage is the pipeline's own, frozen one, bound by ``bind_first_stage``
      (``concat_channels = latent_channels + 1`` is set there). It is not a submodule, so
      its weights are not saved twice; it encodes on whatever device the pipeline put it.
    * Training data has no masks: :meth:`training_inputs` draws one random box per sample,
      each side a uniform ``min_box..max_box`` fraction of the image's side.
    * The null condition is all zeros, both halves (a fixed "no information" input for
      classifier-free guidance, not the latent of a gray image).
    * :meth:`known_region` hands the image and mask to ``Pipeline.sample``, which keeps the
      kept region's latents fixed through the sampler's mask (``keep_known=True``).
    """

    def __init__(
        self,
        *,
        min_box: float = 0.25,
        max_box: float = 0.6,
        image_key: str = "image",
        mask_key: str = "mask",
        style: str = "ldmkit",
    ) -> None:
        super().__init__()
        if not 0.0 < min_box <= max_box <= 1.0:
            raise ValueError(f"need 0 < min_box <= max_box <= 1, got min_box={min_box}, max_box={max_box}")
        if style not in STYLES:
            raise ValueError(f"unknown inpaint style {style!r}; expected one of {STYLES}")
        self.style = style
        self.min_box, self.max_box = float(min_box), float(max_box)
        self.image_key, self.mask_key = image_key, mask_key
        self.input_keys = (image_key, mask_key)
        self.input_kinds = {image_key: "image", mask_key: "mask"}
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        # a tuple hides the module from nn.Module: not a submodule, not in state_dict()
        self._first_stage: tuple[nn.Module, ...] = ()

    @property
    def data_keys(self) -> tuple[str, ...]:
        return (self.image_key,)

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        self._first_stage = (first_stage,)
        self.concat_channels = int(first_stage.latent_channels) + 1

    @property
    def first_stage(self) -> nn.Module:
        if not self._first_stage:
            raise not_bound(self)
        return self._first_stage[0]

    # -- inputs ---------------------------------------------------------------------------
    def _image(self, batch: Mapping[str, Any]) -> Tensor:
        x = torch.as_tensor(self.read(batch, self.image_key))
        if x.ndim != 4 or not x.is_floating_point():
            raise ConditionValueError(
                f"inpaint: batch[{self.image_key!r}] must be float images B×C×H×W in [-1, 1], "
                f"got shape {tuple(x.shape)} ({x.dtype})"
            )
        return check_image_range(x, self.image_key, "inpaint")

    def _mask(self, batch: Mapping[str, Any], image: Tensor) -> Tensor:
        mask = torch.as_tensor(self.read(batch, self.mask_key))
        given = tuple(mask.shape)
        if mask.ndim == 3:
            mask = mask[:, None]
        b, _, h, w = image.shape
        if mask.ndim != 4 or tuple(mask.shape) != (b, 1, h, w):
            raise ConditionValueError(
                f"inpaint: batch[{self.mask_key!r}] has shape {given}, "
                f"but batch[{self.image_key!r}] has shape {tuple(image.shape)}: the mask must be "
                f"B×1×H×W (or B×H×W) of the image's B, H, W"
            )
        mask = mask.to(image.dtype)
        if not ((mask == 0) | (mask == 1)).all():
            raise ConditionValueError(
                f"inpaint: batch[{self.mask_key!r}] (shape {tuple(mask.shape)}) must hold only 0 "
                f"(keep) and 1 (fill), got values in [{float(mask.min())}, {float(mask.max())}]; "
                f"threshold a soft mask first (mask > 0.5)"
            )
        return mask

    def random_masks(
        self, n: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """n box masks B×1×H×W (1 inside the box), sides uniform in ``min_box..max_box``."""
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, 4, generator=generator, device=device)
        sides = torch.tensor([height, width], device=device)
        box = (self.min_box + (self.max_box - self.min_box) * u[:, :2]) * sides
        box = box.round().clamp(min=1).minimum(sides).long()  # box h, w
        start = (u[:, 2:] * (sides - box + 1)).floor().long()  # top, left
        start = start.minimum(sides - box)  # u can round up to 1.0 in float32
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        top, left = start[:, 0, None, None], start[:, 1, None, None]
        inside = (
            (rows >= top) & (rows < top + box[:, 0, None, None])
            & (cols >= left) & (cols < left + box[:, 1, None, None])
        )
        return inside[:, None].float()

    def training_inputs(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> Mapping[str, Any]:
        if self.mask_key in batch:
            return dict(batch)
        image = self._image(batch)
        b, _, h, w = image.shape
        mask = self.random_masks(b, h, w, generator).to(device=image.device, dtype=image.dtype)
        return {**batch, self.mask_key: mask}

    # -- the condition --------------------------------------------------------------------
    def latent_mask(self, mask: Tensor) -> Tensor:
        """B×1×H×W -> B×1×H/f×W/f: a cell is 1 (fill) if any of its pixels is
        (:func:`ldmkit.masks.latent_mask`, the rule ``Pipeline.sample`` uses too)."""
        return masks.latent_mask(mask, int(self.first_stage.downsample_factor))

    def _mask_channel(self, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.style == "paper":
            return F.interpolate(mask * 2 - 1, size=grid)  # scripts/inpaint.py
        return self.latent_mask(mask)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        first_stage = self.first_stage
        image = self._image(batch)
        mask = self._mask(batch, image)
        weight = next(first_stage.parameters(), None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else image.dtype
        # the fill region mid-gray (ldmkit) or black, as the paper's (1 - mask) * image in [0, 1]
        masked = image * (1 - mask) if self.style == "ldmkit" else image.masked_fill(mask.bool(), -1.0)
        with torch.no_grad():  # the first stage is frozen
            z = encode_mean(first_stage, masked.to(device=module_device(first_stage), dtype=dtype))
        like = dict(device=self._anchor.device, dtype=self._anchor.dtype)
        return {"concat": torch.cat([z.to(**like), self._mask_channel(mask, z.shape[-2:]).to(**like)], dim=1)}

    def known_region(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The image and its mask: ``Pipeline.sample`` keeps the latents of the kept region
        (the sampler's ``mask``/``known``), so it ends as the first stage's reconstruction."""
        image = self._image(batch)
        return image, self._mask(batch, image)

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        # the shape without encoding: zeros need no forward pass through the first stage
        first_stage = self.first_stage
        image = self._image(batch)
        self._mask(batch, image)
        _, h, w = first_stage.latent_shape(*image.shape[-2:])
        shape = (image.shape[0], self.concat_channels, h, w)
        return {"concat": torch.zeros(shape, device=self._anchor.device, dtype=self._anchor.dtype)}
