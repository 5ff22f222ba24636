"""What every stage reads from a training batch: the images, checked against the first stage.
Shared by the stage-1 and stage-2 trainers (and the autoencoder evaluation), so that neither
trainer imports the other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldmkit.training.engine import TrainingError


def batch_images(batch: Mapping[str, Any], *, channels: int, device: torch.device) -> Tensor:
    """``batch["image"]`` checked against the first stage (B×C×H×W float in [-1, 1])."""
    if "image" not in batch:
        raise TrainingError(f"a training batch has no 'image' entry (keys: {sorted(batch)})")
    images = batch["image"]
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise TrainingError(
            f"batch['image'] must be a float tensor B×C×H×W, got "
            f"{type(images).__name__} {getattr(images, 'shape', '')}"
        )
    if images.shape[1] != channels:
        raise TrainingError(
            f"the data has {images.shape[1]}-channel images (data.channels) but the first stage "
            f"takes {channels} (first_stage.in_channels); make them agree"
        )
    return images.to(device, non_blocking=True)


def to_unit(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> float32 in [0, 1] (for metrics and image files)."""
    return ((images.clamp(-1, 1) + 1) / 2).float()
