"""A small Fashion-MNIST classifier whose penultimate layer is a feature space for Fréchet
distances where Inception's weights are not available (offline machines). Its distances
are comparable only with each other, never with published FID numbers.

Train it once (a few minutes on two CPU cores)::

    python -m ldmkit.evaluation.classifier --epochs 2

It writes ``$LDMKIT_CACHE/fashion_mnist_classifier.safetensors`` (default
``~/.cache/ldmkit``), which ``eval.fid_features=fashion_mnist`` (or ``auto``) then uses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSIFIER_FILE = "fashion_mnist_classifier.safetensors"
FEATURE_DIM = 128


def default_classifier_path() -> Path:
    root = Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit"))
    return root / CLASSIFIER_FILE


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionMNISTClassifier(nn.Module):
    """Grayscale 32×32 images in [-1, 1] -> 10 logits; ``features`` gives the 128-dim
    pooled representation before the linear head. RGB inputs are averaged to gray and
    other sizes resized to 32×32 (bilinear)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            *_block(1, 32), nn.MaxPool2d(2),
            *_block(32, 64), nn.MaxPool2d(2),
            *_block(64, FEATURE_DIM), nn.MaxPool2d(2),
            *_block(FEATURE_DIM, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        if images.shape[1] != 1:
            images = images.mean(1, keepdim=True)
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        return images

    def features(self, images: Tensor) -> Tensor:
        return self.trunk(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(images)))


def load_classifier(path: str | os.PathLike | None = None) -> FashionMNISTClassifier:
    from ldmkit.losses.perceptual import MissingWeightsError
    from ldmkit.safetensors_io import read_safetensors

    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"the Fashion-MNIST feature classifier {path} does not exist; train it with "
            f"`python -m ldmkit.evaluation.classifier --out {path}` or point "
            f"eval.feature_checkpoint at one"
        )
    model = FashionMNISTClassifier()
    state, own = read_safetensors(path), model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        from ldmkit.errors import WeightsError

        raise WeightsError(
            f"{path} is not a Fashion-MNIST feature classifier ({len(missing)} of its {len(own)} tensors missing, "
            f"{len(unexpected)} others, {len(reshaped)} of another shape); eval.feature_checkpoint names the file "
            "`python -m ldmkit.evaluation.classifier --out FILE` writes"
        )
    model.load_state_dict(state)
    return model.eval()


def fashion_mnist_arrays(split: str, raw_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28 uint8, labels N) of Fashion-MNIST's ``train`` or ``test`` split, read
    from the IDX files in ``raw_dir`` (default: Debian's /usr/share/datasets/fashion-mnist)."""
    from ldmkit.data.sources.fashion_mnist import DEBIAN_DIR, FILES, read_idx

    directory = Path(raw_dir) if raw_dir is not None else Path(DEBIAN_DIR)
    arrays = []
    for stem in FILES[split]:
        candidates = [directory / f"{stem}.gz", directory / stem]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}(.gz) not found in {directory}; pass --raw-dir "
                f"(or install Debian's dataset-fashion-mnist)"
            )
        arrays.append(read_idx(found))
    return arrays[0], arrays[1]


def to_model_input(images: np.ndarray) -> Tensor:
    """uint8 N×28×28 -> N×1×32×32 in [-1, 1], zero-padded (black) by 2 pixels per side."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1.0)[:, None]
    return F.pad(x, (2, 2, 2, 2), value=-1.0)


def train_fashion_mnist_classifier(
    out: str | os.PathLike | None = None,
    *,
    raw_dir: str | os.PathLike | None = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the classifier and write it (safetensors, atomically); returns a summary with
    its test accuracy."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ldmkit.devices import resolve_device
    from ldmkit.io import atomic_write

    torch.manual_seed(seed)
    dev = resolve_device(device)
    out = Path(out) if out is not None else default_classifier_path()
    train_images, train_labels = fashion_mnist_arrays("train", raw_dir)
    test_images, test_labels = fashion_mnist_arrays("test", raw_dir)
    if limit is not None:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
        test_images, test_labels = test_images[:limit], test_labels[:limit]
    x_train, y_train = to_model_input(train_images), torch.from_numpy(train_labels.astype(np.int64))
    x_test, y_test = to_model_input(test_images), torch.from_numpy(test_labels.astype(np.int64))
    model = FashionMNISTClassifier().to(dev)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    bar = tqdm(total=steps, disable=not progress, desc="fashion-mnist classifier")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = x_train[idx]
            # random horizontal flips and 2-pixel shifts, for features that are not too brittle
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(model(x.to(dev)), y_train[idx].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_test), 500):
            correct += int((model(x_test[i : i + 500].to(dev)).argmax(1).cpu() == y_test[i : i + 500]).sum())
    accuracy = correct / len(x_test)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"test_accuracy": f"{accuracy:.4f}", "epochs": str(epochs), "feature_dim": str(FEATURE_DIM)}
    atomic_write(out, lambda p: save_file(state, str(p), metadata=metadata))
    return {"path": str(out), "test_accuracy": accuracy, "epochs": epochs,
            "train_seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldmkit.evaluation.classifier",
        description="Train the Fashion-MNIST classifier whose features ldmkit's Fréchet distance "
        "uses where Inception weights are unavailable.",
    )
    parser.add_argument("--out", default=None, help=f"output file (default {default_classifier_path()})")
    parser.add_argument("--raw-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 helps on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_fashion_mnist_classifier(
        args.out, raw_dir=args.raw_dir, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device=args.device,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
