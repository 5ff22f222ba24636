"""``ldmkit data`` commands, and the installed sources where this machine has them."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from ldmkit.data import SourceNotFoundError, build_dataset, prepare, read_manifest
from ldmkit.data.cli import main, parse_options
from ldmkit.data.sources.fashion_mnist import DEBIAN_DIR, read_idx
from tests.conftest import ldmkit_cli

from .conftest import make_image_folder


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


def bomb_png(width: int, height: int) -> bytes:
    """A 60-byte PNG declaring ``width`` x ``height`` grey pixels (a decompression bomb to PIL
    once that is over twice ``Image.MAX_IMAGE_PIXELS``)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_bomb_and_non_utf8_name_are_skipped_and_named(tmp_path):
    """Before: the bomb raised DecompressionBombError out of `prepare`, the name a
    UnicodeEncodeError writing its metadata; each stopped the whole preparation."""
    root = tmp_path / "images"
    make_image_folder(root, per_class=2)
    (root / "cat" / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    good = (root / "cat" / "img_00.png").read_bytes()
    with open(os.path.join(os.fsencode(root / "dog"), b"caf\xe9.png"), "wb") as f:
        f.write(good)
    os.mkdir(os.path.join(os.fsencode(root), b"r\xe9gion"))  # a class folder named in Latin-1
    with open(os.path.join(os.fsencode(root), b"r\xe9gion", b"x.png"), "wb") as f:
        f.write(good)
    out = tmp_path / "out"
    result = ldmkit_cli(
        "data", "prepare", "image_folder", f"path={root}", f"out={out}", "progress=false"
    )
    assert result.returncode == 0, result.stderr
    assert "split train: 6 samples" in result.stdout
    assert "note: 3 items could not be loaded and were left out" in result.stdout
    lines = result.stdout.splitlines()
    bomb = next(line for line in lines if "bomb.png" in line)
    assert "decompression bomb" in bomb
    assert any(f"{root}/dog/caf\\xe9.png" in line and "not UTF-8" in line for line in lines)
    assert any(f"{root}/r\\xe9gion/x.png" in line and "not UTF-8" in line for line in lines)
    # every file written is valid UTF-8 (the manifest's notes name the files too)
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    assert manifest["classes"] == ["cat", "dog", "owl"]
    assert "\\xe9" in json.dumps(manifest["notes"], ensure_ascii=False)
    assert json.dumps(manifest, ensure_ascii=False).encode("utf-8")
    assert len(build_dataset({"path": str(out), "image_size": 8})) == 6


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


BASE = {"format": "ldmkit-webdataset", "source": "x", "fields": [], "splits": {}}


@pytest.mark.parametrize(
    "content, reason",
    [
        ([], "a JSON list, not an object"),
        ({**BASE, "splits": []}, "'splits'"),
        ({**BASE, "version": "2"}, "'version'"),
        ({**BASE, "fields": None}, "'fields'"),
        ({**BASE, "notes": None}, "'notes'"),
        ({**BASE, "splits": {"train": 3}}, "'splits'"),
    ],
)
def test_malformed_manifest_is_one_line(tmp_path, capsys, content, reason):
    """A manifest written by hand or another tool: before, tracebacks (AttributeError) or lines
    such as "'>' not supported between instances of 'str' and 'int'" that name no file."""
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    for command in ("info", "verify"):
        assert main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ldmkit data {command}: {tmp_path / 'manifest.json'} ")
        assert reason in err and "\n" not in err


def test_data_info_does_not_import_torch(prepared):
    """`ldmkit data info` imported torch (1.6 s of the command) only to read a manifest: through
    ldmkit.data's package imports (the loader) and webdataset's (it imports torch)."""
    import subprocess
    import sys

    out, _ = prepared
    code = (
        "import sys\n"
        "from ldmkit.cli import main\n"
        f"assert main(['data', 'info', {str(out)!r}]) == 0\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "split train: 24 samples in 6 shards" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"
