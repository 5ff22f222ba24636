"""Decoding: a sample's raw tar members -> a training sample (``image``, ``label``, optional
``caption`` and ``segmentation``, ``__key__``), and samples -> one batch (``collate``).

A sample that cannot be decoded raises ``SampleError`` with its kind (``incomplete``: a
member is missing; ``corrupt``: a member does not decode); the readers (``ShardStream``,
``ShardDataset``) skip it and count it in their ``DataStats``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ldmkit.data.manifest import Manifest
from ldmkit.data.shards import CAPTION, IMAGE, LABEL, META, SEGMENTATION
from ldmkit.data.transforms import ImageTransform


class SampleError(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class SampleDecoder:
    """Raw tar members -> a training sample dict (``image``, ``label``, optional ``caption`` and
    ``segmentation``, ``__key__``)."""

    fields: tuple[str, ...]  # the members a sample must have
    transform: ImageTransform

    @classmethod
    def for_manifest(cls, manifest: Manifest, transform: ImageTransform) -> SampleDecoder:
        # the json member is for people and tools; training does not need it intact
        return cls(tuple(f for f in manifest.fields if f != META), transform)

    @property
    def with_caption(self) -> bool:
        return CAPTION in self.fields

    @property
    def with_segmentation(self) -> bool:
        return SEGMENTATION in self.fields

    def __call__(self, raw: Mapping[str, Any], rng: Any = None) -> dict[str, Any]:
        missing = [f for f in self.fields if f not in raw]
        if missing:
            raise SampleError("incomplete", f"no {', '.join(missing)} member")
        try:
            image = _open_png(raw[IMAGE])
            label = int(raw[LABEL].decode("ascii")) if LABEL in raw else -1
            sample: dict[str, Any] = {"label": label}
            if self.with_caption:
                sample["caption"] = raw[CAPTION].decode("utf-8")
            segmentation = None
            if self.with_segmentation:
                segmentation = _open_png(raw[SEGMENTATION])
                if segmentation.mode != "L" or segmentation.size != image.size:
                    raise ValueError(
                        f"class map is {segmentation.mode} {segmentation.size}, "
                        f"image is {image.size}"
                    )
        # PIL reports broken PNGs through many exception types (OSError, SyntaxError, zlib and
        # struct errors, ValueError); any of them means this one sample is unusable
        except Exception as exc:
            raise SampleError("corrupt", f"{type(exc).__name__}: {exc}") from exc
        sample["image"], seg = self.transform(image, segmentation, rng)
        if seg is not None:
            sample["segmentation"] = seg
        sample["__key__"] = str(raw["__key__"])
        return sample


def _open_png(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names only an in-memory buffer's address
        raise ValueError(f"not an image PIL can identify ({len(data)} bytes)") from None
    image.load()  # decode now, so damage shows up here and not in the transform
    return image


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts -> one batch, whatever the keys: tensors are stacked, numbers become
    a tensor (int64 / float32), everything else (captions, ``__key__``) a list. Which keys a
    model reads is its conditioner's business (``Conditioner.input_keys``), not the loader's."""
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if key.startswith("__"):
            batch[key] = values
        elif isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool | int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch
