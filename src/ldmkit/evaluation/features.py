"""Feature networks for Fréchet distances: Inception-v3's 2048-dim pool features where its
weights are on disk, else the project's own Fashion-MNIST classifier. Each names its output
size as ``num_features``, so it plugs into torchmetrics' image metrics as their ``feature``
(:func:`ldmkit.evaluation.frechet.frechet_metric`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.losses.perceptual import MissingWeightsError, torch_hub_checkpoints_dir

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
FEATURES = ("inception", "fashion_mnist")


def inception_weights_path() -> Path:
    return torch_hub_checkpoints_dir() / INCEPTION_FILE


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 (ImageNet weights ``inception_v3_google-0cc3c7bd.pth``)
    without its classifier: images in [-1, 1] (the Google weights' input range), resized to
    299×299, grayscale repeated to RGB -> 2048 features. Its distances use torchvision's
    port of the weights, so they are close to but not identical with the reference FID."""

    dim = num_features = 2048
    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        path = Path(weights) if weights is not None else inception_weights_path()
        if not path.is_file():
            raise MissingWeightsError(
                f"Inception features need torchvision's Inception-v3 weights, file "
                f"{INCEPTION_FILE!r}, looked for in the torch hub checkpoints folder "
                f"{path.parent}; copy it there, or use eval.fid_features=fashion_mnist"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.fc = nn.Identity()
        self.model = model.eval()

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.model(images)


class FashionMNISTFeatures(nn.Module):
    dim = num_features = 128
    name = "fashion_mnist"

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from ldmkit.evaluation.classifier import load_classifier

        self.model = load_classifier(weights)

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images)


def build_feature_extractor(name: str, *, weights: str | os.PathLike | None = None) -> nn.Module:
    """``inception`` | ``fashion_mnist`` (raises MissingWeightsError naming the file)."""
    if name == "inception":
        return InceptionFeatures(weights).eval()
    if name == "fashion_mnist":
        return FashionMNISTFeatures(weights).eval()
    raise ValueError(f"unknown feature network {name!r}; expected one of {FEATURES}")


def auto_feature_extractor(weights: str | os.PathLike | None = None) -> tuple[nn.Module | None, str]:
    """Inception where its weights exist, else the Fashion-MNIST classifier where it exists;
    ``(None, reason)`` when neither does."""
    reasons = []
    for name in FEATURES:
        try:
            return build_feature_extractor(name, weights=weights if name == "fashion_mnist" else None), name
        except MissingWeightsError as err:
            reasons.append(str(err))
    return None, " | ".join(reasons)
