"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 70,000 28x28 grayscale product photos, 10 classes.

Read from the IDX files of Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/
fashion-mnist``), a folder given with ``path=``, or torchvision's download where online.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldmkit.config_checks import Boolean, Choice, Either
from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format: magic 0x0000 08 <ndim>, big-endian dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:  # a download cut short, or another file under the name
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"fashion_mnist: {path} is damaged: {exc}") from None
    if len(raw) < 4 or len(raw) < 4 + 4 * raw[3]:
        raise DataError(f"fashion_mnist: {path} is damaged: {len(raw)} bytes, too short for IDX")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"fashion_mnist: {path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"fashion_mnist: {path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


class FashionMNIST(Source):
    name = "fashion_mnist"
    description = "Fashion-MNIST, 28x28 grayscale, 10 classes (train 60k / test 10k)"
    options = {"path": None, "download": "auto"}
    option_specs = {"download": Either(Boolean(), Choice("auto"))}
    has_captions = True  # the class name, for text-conditioning demos
    shuffle_items = False  # the IDX order is already class-mixed

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.directory = self._locate()
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _locate(self) -> Path:
        if self.config["path"] is not None:
            directory = Path(self.config["path"]).expanduser()
            if not self._complete(directory):
                raise SourceNotFoundError(
                    f"fashion_mnist: {directory} does not hold the four Fashion-MNIST IDX files "
                    f"({', '.join(f + '.gz' for pair in FILES.values() for f in pair)})"
                )
            return directory
        debian = Path(DEBIAN_DIR)
        if self._complete(debian):
            return debian
        download = self.config["download"]
        if download in (True, "auto"):
            try:
                return self._download()
            except Exception as exc:  # offline, or torchvision's mirrors unreachable
                reason = f" (torchvision download failed: {exc})"
        else:
            reason = ""
        raise SourceNotFoundError(
            f"fashion_mnist: the dataset files are not installed{reason}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (files in {DEBIAN_DIR}), or pass "
            f"path=DIR pointing at a folder with the IDX files, or run once online "
            f"(torchvision downloads them)."
        )

    @staticmethod
    def _complete(directory: Path) -> bool:
        return all(_find(directory, stem) for pair in FILES.values() for stem in pair)

    def _download(self) -> Path:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        root = Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit"))
        for train in (True, False):
            TorchvisionFashionMNIST(str(root), train=train, download=True)
        return root / "FashionMNIST" / "raw"

    @property
    def splits(self) -> list[str]:
        return ["train", "test"]

    @property
    def classes(self) -> list[str]:
        return list(CLASSES)

    def _split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            images_stem, labels_stem = FILES[split]
            images = read_idx(_find(self.directory, images_stem))
            labels = read_idx(_find(self.directory, labels_stem))
            if len(images) != len(labels):
                raise DataError(
                    f"fashion_mnist {split}: {len(images)} images but {len(labels)} labels "
                    f"in {self.directory}"
                )
            if labels.size and int(labels.max()) >= len(CLASSES):
                raise DataError(
                    f"fashion_mnist: {_find(self.directory, labels_stem)} has label "
                    f"{int(labels.max())}; Fashion-MNIST has {len(CLASSES)} classes"
                )
            self._arrays[split] = (images, labels)
        return self._arrays[split]

    def items(self, split: str) -> Sequence[Any]:
        images, _ = self._split_arrays(split)
        return [(split, index) for index in range(len(images))]

    def load(self, item: tuple[str, int]) -> SourceSample:
        split, index = item
        images, labels = self._split_arrays(split)
        label = int(labels[index])
        return SourceSample(
            image=Image.fromarray(images[index]),
            label=label,
            caption=CLASSES[label].lower(),
            meta={"class_name": CLASSES[label], "origin": f"{split}[{index}]"},
        )
