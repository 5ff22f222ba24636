"""Semantic-map conditioning (the paper's semantic synthesis, Sec. 4.3.2): a per-pixel
class-id map, one-hot encoded and rescaled to the latent grid, concatenated to z_t."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldmkit.interfaces import Conditioner, ConditionValueError
from ldmkit_conditioners.rescaler import (
    SpatialRescaler,
    describe_sample,
)


class SemanticMapConditioner(Conditioner):
    """``batch[input_key]`` (B×H×W or B×1×H×W integer ids in ``0..num_classes-1``)
    -> one-hot (K channels) -> :class:`SpatialRescaler` (``n_stages`` halvings, optional
    1×1 ``out_channels`` mapper) -> ``{"concat": B×C×H/2^n×W/2^n}``.

    ``concat_channels = out_channels or num_classes``. ``n_stages`` must be log2 of the
    first stage's f (the map has the image's size). The map's size sets the latent's: a
    map twice the training size gives a concat twice as large, which is how the paper
    samples larger images convolutionally (Sec. 4.3.2). The null condition is all zeros
    ("no class anywhere"). Float maps are refused rather than rounded.

    ``method="unshuffle"`` keeps every pixel of the map instead of interpolating it: each
    f×f block of the one-hot map becomes ``f * f * num_classes`` channels of its latent cell
    (``pixel_unshuffle``), so an object thinner than a latent cell still reaches the UNet,
    where it is (``concat_channels = out_channels or num_classes * f * f``; the 1×1 mapper,
    if any, comes after). An ldmkit extension; the paper's ``SpatialRescaler`` interpolates.
    """

    def __init__(
        self,
        *,
        num_classes: int = 8,
        n_stages: int = 2,
        out_channels: int | None = None,
        method: str = "bilinear",
        input_key: str = "segmentation",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.input_key = int(num_classes), input_key
        self.input_keys = (input_key,)
        self.input_kinds = {input_key: "segmentation"}
        self.unshuffle = method == "unshuffle"
        if self.unshuffle:
            if int(n_stages) != n_stages or n_stages < 1:
                raise ValueError(f"n_stages must be an integer >= 1 with method='unshuffle', got {n_stages!r}")
            # the rescaler only maps channels; the n_stages halvings are the unshuffle's
            self.rescaler = SpatialRescaler(n_stages=0, in_channels=num_classes * 4 ** int(n_stages),
                                            out_channels=out_channels)  # fmt: skip
        else:
            self.rescaler = SpatialRescaler(
                n_stages=n_stages, method=method, in_channels=num_classes, out_channels=out_channels
            )
        self.n_stages = int(n_stages)  # the map shrinks by 2**n_stages either way
        self.concat_channels = self.rescaler.out_channels
        # follows .to(device) when out_channels is None and there are no weights
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self._first_stage_f: int | None = None

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        # checked when used, not here: composing this option with any first stage must work
        self._first_stage_f = int(first_stage.downsample_factor)

    def class_ids(self, batch: Mapping[str, Any]) -> Tensor:
        """The map as B×H×W int64, checked against ``num_classes``."""
        ids = torch.as_tensor(self.read(batch, self.input_key))
        if ids.ndim == 4 and ids.shape[1] == 1:
            ids = ids[:, 0]
        if ids.ndim != 3:
            raise ConditionValueError(
                f"semantic_map: batch[{self.input_key!r}] must be B×H×W or B×1×H×W class ids, "
                f"got shape {tuple(ids.shape)}"
            )
        if ids.is_floating_point() or ids.is_complex():
            raise ConditionValueError(
                f"semantic_map: batch[{self.input_key!r}] must hold integer class ids, got {ids.dtype}"
            )
        ids = ids.long()
        bad = (ids < 0) | (ids >= self.num_classes)
        if bad.any():
            index = int(rearrange(bad, "b h w -> b (h w)").any(dim=1).nonzero()[0])
            value = int(ids[index][bad[index]][0])
            raise ConditionValueError(
                f"semantic_map: class id {value} in batch[{self.input_key!r}] of "
                f"{describe_sample(batch, self.input_key, index)} is outside 0..{self.num_classes - 1} "
                f"(num_classes={self.num_classes})"
            )
        return ids

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        ids = self.class_ids(batch).to(self._anchor.device)
        f, n = self._first_stage_f, self.n_stages
        if f is not None and 2**n != f:
            raise ConditionValueError(
                f"semantic_map: n_stages={n} shrinks the map by {2**n}, but the first stage has "
                f"f={f}; set conditioner.n_stages={f.bit_length() - 1}"
            )
        h, w = ids.shape[-2:]
        if h % 2**n or w % 2**n:  # the halvings would floor it: a smaller sample, the last rows dropped
            raise ConditionValueError(
                f"semantic_map: a {h}x{w} batch[{self.input_key!r}] is not divisible by f={2**n}: the map "
                "has the image's size, a multiple of the first stage's f"
            )
        one_hot = rearrange(F.one_hot(ids, self.num_classes), "b h w k -> b k h w")
        # the anchor follows .to(dtype) too, so the one-hot matches the mapper's weights
        one_hot = one_hot.to(self._anchor.dtype)
        if self.unshuffle:
            one_hot = F.pixel_unshuffle(one_hot, 2**n)
        return {"concat": self.rescaler(one_hot)}
