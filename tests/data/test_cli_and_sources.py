"""``ldmkit data`` commands, and the installed sources where this machine has them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmkit.data import SourceNotFoundError, build_dataset, prepare, read_manifest
from ldmkit.data.cli import main, parse_options
from ldmkit.data.sources.fashion_mnist import DEBIAN_DIR, read_idx


def test_parse_options_keeps_paths_as_text():
    assert parse_options(["limit=10", "overwrite=true", "path=2024", "val_fraction=0.1"]) == {
        "limit": 10, "overwrite": True, "path": "2024", "val_fraction": 0.1,
    }  # fmt: skip


def test_prepare_info_verify(tmp_path, image_folder, capsys):
    root, _ = image_folder
    out = tmp_path / "cli"
    assert main(["prepare", "image_folder", f"out={out}", f"path={root}", "shard_size=10",
                 "progress=false"]) == 0  # fmt: skip
    assert "split train: 24 samples in 3 shards" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "classes (3): cat, dog, owl" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    (out / "train-000001.tar").write_bytes(b"x")
    assert main(["verify", str(out)]) == 1
    assert "train-000001.tar has 1 bytes" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["prepare", "nonsense", f"out={tmp_path}"]) == 2
    assert "unknown data source 'nonsense'" in capsys.readouterr().err
    assert main(["prepare", "image_folder", f"out={tmp_path}", f"path={tmp_path / 'x'}"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "ldmkit data prepare" in capsys.readouterr().err


def test_fashion_mnist_installed(tmp_path):
    if not Path(DEBIAN_DIR).is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    manifest = prepare("fashion_mnist", tmp_path / "fm", limit=16, progress=False)
    labels = read_idx(Path(DEBIAN_DIR) / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(Path(DEBIAN_DIR) / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and manifest.splits["test"].num_samples == 16
    dataset = build_dataset(
        {"path": str(tmp_path / "fm"), "image_size": 28, "channels": 1}, split="test"
    )
    sample = dataset[5]
    index = int(sample["__key__"].rsplit("-", 1)[1])
    assert sample["label"] == labels[index]
    assert np.array_equal(((sample["image"][0] + 1) * 127.5).round().numpy(), images[index])


@pytest.mark.parametrize("source", ["emoji", "tuxpaint"])
def test_cutout_sources_installed(tmp_path, source):
    try:
        manifest = prepare(source, tmp_path / source, limit=6, progress=False)
    except SourceNotFoundError as exc:
        pytest.skip(str(exc))
    assert manifest.splits["train"].num_samples == 6
    assert manifest.image_mode == "RGBA"
    expected = [64, 64] if source == "emoji" else [128, 128]
    assert manifest.image_size == expected
    dataset = build_dataset({"path": str(tmp_path / source), "image_size": 32})
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["caption"] and 0 <= sample["label"] < len(manifest.classes)
        assert sample["image"].shape == (3, 32, 32)
    data = json.loads((tmp_path / source / "manifest.json").read_text())
    assert data["format"] == "ldmkit-webdataset"
    assert read_manifest(tmp_path / source).classes == manifest.classes
