"""Evaluators and metrics for the conditioning tasks of issue 8 (see conditioning_tasks.py).

Everything here is trained or computed on **real** data only, so it can judge samples:

* ``cutout_classifier`` -- a small CNN that tells the 8 categories of ``data=cutouts`` apart
  (3x32x32 RGB on white), trained on the real train split; its accuracy on the real held-out
  ``val`` split is the reference for the text-to-image figure.
* ``scene_segmenter`` -- a tiny fully convolutional UNet that labels every pixel of a semantic
  scene with one of its K classes, trained on real train scenes at 32x32 and 64x64 (so it
  reads both sample sizes); its mIoU on the real ``val`` scenes is the reference.
* ``fashion_mnist_features`` -- the project's Fashion-MNIST classifier
  (``python -m ldmkit.evaluation.classifier``), whose 128-d penultimate features give the
  Fréchet distances of the super-resolution and inpainting figures.

Metrics (images in [-1, 1], mapped to [0, 1] first):

* ``miou(pred, target, K)``: one K x K confusion matrix over *all pixels of all images*;
  IoU_k = TP_k / (TP_k + FP_k + FN_k); mIoU = the mean over the classes that occur in the
  target or the prediction (background, class 0, included).
* ``masked_psnr(x, y, region)``: per image, MSE over the pixels where ``region == 1`` (all
  channels), PSNR = 10 log10(1 / MSE); the mean over images.
* ``frechet(a, b, features)``: the Fréchet distance between Gaussians fitted to the features of
  two image sets (``ldmkit.evaluation.frechet``).
* Fréchet distance *of the filled region* (inpainting): each sample is composed as
  ``real * (1 - mask) + filled * mask`` (mask = 1 in the box to fill), so only the box differs
  from the real image; the figure is ``frechet(composites, the real images)``. The mean-fill
  baseline fills the box with the per-channel mean of that image's known pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.data import build_dataset, read_manifest
from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats
from ldmkit.evaluation.metrics import psnr, ssim

CACHE = Path("runs/eval")


# -- data ----------------------------------------------------------------------------------
def load_split(
    path: str | Path, split: str, *, image_size: int, channels: int = 3, limit: int | None = None
) -> dict[str, Any]:
    """A prepared split as tensors: ``image`` N x C x S x S in [-1, 1], ``label`` N,
    ``caption`` list, ``segmentation`` N x S x S (nearest-resized) when the data has maps,
    ``__key__``; in key order, so the order does not depend on shard layout."""
    cfg = {"path": str(path), "image_size": image_size, "channels": channels, "flip": False}
    dataset = build_dataset(cfg, split=split)
    items = sorted((dataset[i] for i in range(len(dataset))), key=lambda s: s["__key__"])
    items = items[:limit] if limit is not None else items
    out: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in items]),
        "label": torch.tensor([int(s["label"]) for s in items]),
        "caption": [s.get("caption", "") for s in items],
        "__key__": [s["__key__"] for s in items],
    }
    if "segmentation" in items[0]:
        out["segmentation"] = torch.stack(
            [torch.as_tensor(s["segmentation"]) for s in items]
        ).long()
    return out


def to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


# -- metrics -------------------------------------------------------------------------------
def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    index = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Any]:
    """mIoU from one confusion matrix over all pixels (see the module docstring)."""
    matrix = confusion(pred, target, num_classes).double()
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return {
        "miou": float(iou[present].mean()),
        "pixel_accuracy": float(tp.sum() / matrix.sum()),
        "per_class_iou": [None if math.isnan(v) else round(float(v), 4) for v in iou],
    }


def masked_psnr(x: Tensor, y: Tensor, region: Tensor) -> Tensor:
    """Per-image PSNR over ``region`` (B x 1 x H x W, 1 = counted); x, y in [-1, 1]."""
    x, y = to_unit(x), to_unit(y)
    region = region.float().expand_as(x)
    mse = ((x - y) ** 2 * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def image_psnr_ssim(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR and SSIM (ldmkit.evaluation.metrics) of images in [-1, 1]."""
    return psnr(to_unit(x), to_unit(y)), ssim(to_unit(x), to_unit(y))


@torch.no_grad()
def feature_stats(images: Tensor, features: nn.Module, batch_size: int = 500) -> FeatureStats:
    stats: FeatureStats | None = None
    for start in range(0, len(images), batch_size):
        f = features(images[start : start + batch_size].float())
        stats = stats or FeatureStats(f.shape[1])
        stats.update(f)
    assert stats is not None
    return stats


def frechet(a: Tensor, b: Tensor | FeatureStats, features: nn.Module) -> float:
    reference = b if isinstance(b, FeatureStats) else feature_stats(b, features)
    return frechet_distance_from_stats(feature_stats(a, features), reference)


def mean_fill(images: Tensor, mask: Tensor) -> Tensor:
    """Fill ``mask == 1`` with each image's per-channel mean over its known pixels."""
    known = 1 - mask.float()
    mean = (images * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp_min(1)
    return images * known + mean * mask


def compose(real: Tensor, filled: Tensor, mask: Tensor) -> Tensor:
    return real * (1 - mask) + filled * mask


def fashion_mnist_features() -> nn.Module:
    """The project's Fashion-MNIST classifier features (raises naming the missing file)."""
    from ldmkit.evaluation.features import build_feature_extractor

    return build_feature_extractor("fashion_mnist")


# -- small networks --------------------------------------------------------------------------
def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class CutoutClassifier(nn.Module):
    """RGB 32x32 in [-1, 1] -> category logits."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            *_conv(3, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(0.3), nn.Linear(4 * w, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 32:
            x = F.interpolate(
                x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False
            )
        return self.net(x)


class TinySegmenter(nn.Module):
    """A two-level UNet: RGB H x W (H, W divisible by 4) -> K x H x W logits."""

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*_conv(3, w), *_conv(w, w))
        self.enc2 = nn.Sequential(*_conv(w, 2 * w), *_conv(2 * w, 2 * w))
        self.mid = nn.Sequential(*_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w))
        self.dec2 = nn.Sequential(*_conv(6 * w, 2 * w))
        self.dec1 = nn.Sequential(*_conv(3 * w, w))
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)


def _shift(x: Tensor, generator: torch.Generator, pad: int, maps: Tensor | None = None):
    """Random translation by up to ``pad`` pixels (replicate padding) and horizontal flip."""
    b, _, h, w = x.shape
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    x = F.pad(x, (pad,) * 4, mode="replicate")[..., dy : dy + h, dx : dx + w]
    if maps is not None:
        maps = F.pad(maps[:, None].float(), (pad,) * 4, mode="replicate")[:, 0].long()
        maps = maps[..., dy : dy + h, dx : dx + w]
    if flip:
        x = x.flip(-1)
        maps = maps.flip(-1) if maps is not None else None
    return x, maps


def _save(model: nn.Module, path: Path, summary: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))


def _load(model: nn.Module, path: Path) -> dict[str, Any] | None:
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return json.loads(path.with_suffix(".json").read_text())


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 250) -> Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cutout_classifier(
    data: str | Path = "data/cutouts", *, steps: int = 2000, seed: int = 0, retrain: bool = False
) -> tuple[CutoutClassifier, dict[str, Any]]:
    """The category classifier of ``data=cutouts``, trained once and cached under runs/eval/.

    Adam (lr 2e-3, cosine to 0), batch 64, ``steps`` steps; random shifts (2 px) and flips;
    the loss weights each class by the inverse of its train frequency, so the classifier does
    not favour the large categories (the prompts it judges are balanced per category).
    """
    classes = read_manifest(data).classes
    model = CutoutClassifier(len(classes))
    path = CACHE / "cutouts_classifier.safetensors"
    summary = None if retrain else _load(model, path)
    if summary is not None:
        return model.eval(), summary
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, val = (load_split(data, s, image_size=32) for s in ("train", "val"))
    counts = torch.bincount(train["label"], minlength=len(classes)).float()
    weight = counts.sum() / (len(classes) * counts.clamp_min(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(train["label"]), (64,), generator=generator)
        x, _ = _shift(train["image"][index], generator, pad=2)
        loss = F.cross_entropy(model(x), train["label"][index], weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    pred = predict(model, val["image"]).argmax(1)
    summary = {
        "classes": classes,
        "steps": steps,
        "train_images": len(train["label"]),
        "val_images": len(val["label"]),
        **accuracy_summary(pred, val["label"], len(classes)),
    }
    _save(model, path, summary)
    return model.eval(), summary


def accuracy_summary(pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy, and balanced accuracy (the mean of the per-class recalls)."""
    recalls = [
        float((pred[target == k] == k).float().mean())
        for k in range(num_classes)
        if (target == k).any()
    ]
    return {
        "accuracy": float((pred == target).float().mean()),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "per_class_recall": [round(r, 4) for r in recalls],
    }


def scene_segmenter(
    data: str | Path = "data/semantic_scenes",
    *,
    steps: int = 1500,
    seed: int = 0,
    retrain: bool = False,
) -> tuple[TinySegmenter, dict[str, Any]]:
    """The per-pixel segmenter of ``data=semantic_scenes``, trained once, cached under runs/eval/.

    Trained on the real train scenes at 32x32 and at 64x64 (alternating steps, the maps
    nearest-resized as the loader does), Adam lr 2e-3 cosine to 0, batch 32, random shifts and
    flips; evaluated on the real val scenes at both sizes.
    """
    manifest = read_manifest(data)
    num_classes = len(manifest.segmentation_classes)
    model = TinySegmenter(num_classes)
    path = CACHE / "scenes_segmenter.safetensors"
    summary = None if retrain else _load(model, path)
    if summary is not None:
        return model.eval(), summary
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = {s: load_split(data, "train", image_size=s) for s in (32, 64)}
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step in range(steps):
        size = 32 if step % 2 == 0 else 64
        data_s = train[size]
        index = torch.randint(0, len(data_s["image"]), (32,), generator=generator)
        x, maps = _shift(
            data_s["image"][index], generator, pad=size // 16, maps=data_s["segmentation"][index]
        )
        loss = F.cross_entropy(model(x), maps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    summary = {"classes": manifest.segmentation_classes, "steps": steps, "val": {}}
    for size in (32, 64):
        val = load_split(data, "val", image_size=size)
        pred = predict(model, val["image"]).argmax(1)
        summary["val"][str(size)] = miou(pred, val["segmentation"], num_classes)
    _save(model, path, summary)
    return model.eval(), summary


def segment(model: nn.Module, images: Tensor) -> Tensor:
    return predict(model, images, batch_size=100).argmax(1)


def rounded(values: Sequence[float] | Tensor, digits: int = 4) -> dict[str, float]:
    t = torch.as_tensor(values, dtype=torch.float64)
    return {
        "mean": round(float(t.mean()), digits),
        "std": round(float(t.std()), digits) if len(t) > 1 else 0.0,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="train (or load) the evaluators and print their figures"
    )
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["classifier", "segmenter"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "classifier"):
        print(json.dumps(cutout_classifier(retrain=args.retrain)[1], indent=2))
    if args.only in (None, "segmenter"):
        print(json.dumps(scene_segmenter(retrain=args.retrain)[1], indent=2))
