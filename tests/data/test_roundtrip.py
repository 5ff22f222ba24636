"""prepare -> shards -> load gives back the very pixels, labels and captions."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch

from ldmkit.data import build_dataloader, build_dataset, prepare, read_manifest, verify
from ldmkit.data.transforms import to_uint8

from .conftest import CLASSES, loader_cfg


def origin_of(directory, split="train") -> dict[str, str]:
    """key -> origin, read straight from the tar members' json (not through ldmkit)."""
    origins = {}
    for path in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    origins[member.name.split(".")[0]] = meta["origin"]
    return origins


def test_manifest_counts_and_checksums(prepared):
    out, expected = prepared
    manifest = read_manifest(out)
    split = manifest.splits["train"]
    assert split.num_samples == len(expected) == 24
    assert [s.name for s in split.shards] == [f"train-{i:06d}.tar" for i in range(6)]
    assert [s.num_samples for s in split.shards] == [4] * 6
    for shard in split.shards:
        data = (out / shard.name).read_bytes()
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.bytes == len(data)
    assert manifest.classes == list(CLASSES)
    assert manifest.fields == ["cls", "json", "png", "txt"]
    assert verify(out) == []
    # a tampered shard is caught
    path = out / split.shards[2].name
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    assert verify(out) == [f"train: {path.name} checksum differs from the manifest"]


def test_map_dataset_round_trips_pixels_labels_captions(prepared):
    out, expected = prepared
    dataset = build_dataset(loader_cfg(out), split="train")
    origins = origin_of(out)
    assert len(dataset) == len(expected)
    seen = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        pixels, label, caption = expected[origins[sample["__key__"]]]
        assert sample["image"].dtype == torch.float32
        assert sample["image"].min() >= -1 and sample["image"].max() <= 1
        # 12x10 images, image_size 10: the center crop keeps columns 1..10
        np.testing.assert_array_equal(
            to_uint8(sample["image"]).permute(1, 2, 0).numpy(), pixels[:, 1:11]
        )
        assert sample["label"] == label
        assert sample["caption"] == caption
        seen.add(sample["__key__"])
    assert len(seen) == len(expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_round_trips_every_sample_once(prepared, num_workers):
    out, expected = prepared
    loader = build_dataloader(loader_cfg(out), batch_size=5, num_workers=num_workers, seed=3)
    origins = origin_of(out)
    keys = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 10, 10)
        for image, label, caption, key in zip(
            batch["image"], batch["label"], batch["caption"], batch["__key__"], strict=True
        ):
            pixels, true_label, true_caption = expected[origins[key]]
            # 12x10 images are center-cropped to 10x10: columns 1..10
            np.testing.assert_array_equal(to_uint8(image).permute(1, 2, 0).numpy(), pixels[:, 1:11])
            assert int(label) == true_label and caption == true_caption
            keys.append(key)
    assert sorted(keys) == sorted(origins)
    assert loader.stats.samples == 24 and loader.stats.skipped == 0


def test_shuffle_differs_per_epoch_and_is_seeded(prepared):
    out, _ = prepared

    def order(seed, epochs=2):
        loader = build_dataloader(loader_cfg(out), batch_size=24, seed=seed)
        return [next(iter(loader))["__key__"] for _ in range(epochs)]

    first, second = order(0)
    assert sorted(first) == sorted(second) and first != second
    assert order(0) == [first, second]
    assert order(1)[0] != first


def test_fashion_mnist_idx_round_trip(tmp_path, fake_fashion_mnist):
    directory, arrays = fake_fashion_mnist
    out = tmp_path / "fm"
    manifest = prepare("fashion_mnist", out, path=str(directory), progress=False)
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 30, "test": 10}
    assert manifest.image_mode == "L" and manifest.image_size == [28, 28]
    for split in ("train", "test"):
        images, labels = arrays[split]
        dataset = build_dataset(
            {"source": "fashion_mnist", "path": str(out), "image_size": 28, "channels": 1},
            split=split,
        )
        assert len(dataset) == len(images)
        for i in range(len(dataset)):
            sample = dataset[i]
            index = int(sample["__key__"].rsplit("-", 1)[1])  # written in IDX order
            assert sample["image"].shape == (1, 28, 28)
            np.testing.assert_array_equal(to_uint8(sample["image"])[0].numpy(), images[index])
            assert sample["label"] == labels[index]
            assert sample["caption"] == manifest.classes[labels[index]].lower()


def test_limit_split_and_val_fraction(tmp_path, image_folder):
    root, _ = image_folder
    manifest = prepare(
        "image_folder", tmp_path / "o", path=str(root), val_fraction=0.25, progress=False
    )
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"val": 6, "train": 18}
    # preparing the same split again needs overwrite=true and keeps the other split
    with pytest.raises(Exception, match="overwrite=true"):
        prepare("image_folder", tmp_path / "o", path=str(root), split="train", progress=False)
    manifest = prepare(
        "image_folder", tmp_path / "o", path=str(root), split="val", limit=5,
        val_fraction=0.25, overwrite=True, progress=False,
    )  # fmt: skip
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"val": 5, "train": 18}
    assert sorted(p.name for p in (tmp_path / "o").glob("val-*.tar")) == [
        s.name for s in manifest.splits["val"].shards
    ]


def test_same_inputs_give_identical_shards(tmp_path, image_folder):
    root, _ = image_folder
    a = prepare("image_folder", tmp_path / "a", path=str(root), progress=False)
    b = prepare("image_folder", tmp_path / "b", path=str(root), progress=False)
    c = prepare("image_folder", tmp_path / "c", path=str(root), seed=1, progress=False)
    digests = [[s.sha256 for s in m.splits["train"].shards] for m in (a, b, c)]
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]  # another seed, another write order


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_shards_written_by_other_tools_are_read(tmp_path, fmt):
    """Long member names (pax records, GNU long-name members, ustar prefix), directories and
    a typeflag we skip, all read like tarfile reads them."""
    import io

    from ldmkit.data.shards import iter_tar_members

    deep = "d" * 60 + "/" + "e" * 60  # needs the ustar prefix field or an extension
    members = [
        (f"{deep}/sample1.png", b"\x89PNG" + bytes(range(256)) * 3),
        (f"{deep}/sample1.cls", b"2"),
        ("sample2." + "x" * (90 if fmt == tarfile.USTAR_FORMAT else 150), b"long ext"),
        ("empty.txt", b""),
    ]
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo("adir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert list(iter_tar_members(f)) == members


def test_map_dataset_batches_like_the_stream(prepared):
    out, _ = prepared
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(build_dataset(loader_cfg(out)), batch_size=4, shuffle=True)))
    stream = next(iter(build_dataloader(loader_cfg(out), batch_size=4)))
    assert set(batch) == set(stream) == {"image", "label", "caption", "__key__"}
    for key in ("image", "label"):
        assert batch[key].dtype == stream[key].dtype and batch[key].shape == stream[key].shape
    assert isinstance(batch["caption"], list) and isinstance(batch["__key__"], list)
