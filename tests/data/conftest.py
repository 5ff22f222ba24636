"""Tiny on-disk datasets for the data tests (made in tmp_path, no installed source needed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import prepare

CLASSES = ("cat", "dog", "owl")


def make_image_folder(root: Path, per_class: int = 8, size: tuple[int, int] = (12, 10)) -> dict:
    """RGB noise images under root/<class>/; every other one has a caption sidecar.

    Returns origin (relative path) -> (pixels, label, caption) as written.
    """
    rng = np.random.default_rng(1234)
    expected = {}
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = root / name / f"img_{i:02d}.png"
            Image.fromarray(pixels).save(path)
            caption = ""
            if i % 2 == 0:
                caption = f"{name} number {i}"
                path.with_suffix(".txt").write_text(caption + "\n")
            expected[f"{name}/img_{i:02d}.png"] = (pixels, label, caption)
    return expected


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "images"
    return root, make_image_folder(root)


@pytest.fixture
def prepared(tmp_path: Path, image_folder) -> tuple[Path, dict]:
    """24 images in 6 shards of 4 samples."""
    root, expected = image_folder
    out = tmp_path / "shards"
    prepare("image_folder", out, path=str(root), shard_size=4, progress=False)
    return out, expected


def loader_cfg(path: Path, **overrides) -> dict:
    cfg = {"source": "image_folder", "path": str(path), "image_size": 10, "channels": 3,
           "shuffle_buffer": 16}  # fmt: skip
    cfg.update(overrides)
    return cfg


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as documented at yann.lecun.com/exdb/mnist: 0x00 0x00 0x08 ndim, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(7)
    directory = tmp_path / "fmnist"
    directory.mkdir()
    arrays = {}
    for split, stem, n in (("train", "train", 30), ("test", "t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{stem}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return directory, arrays
