"""``skimage_photos``: seeded square crops of scikit-image's bundled photos, prepared on disk
with the real CLI and read back through the loader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import build_dataloader, prepare, read_manifest, verify
from tests.conftest import ldmkit_cli

from .test_semantic_scenes import decode, read_split

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (ldmkit[photos]) is not installed")

OPTIONS = ["photos=coffee,camera", "crops=3", "val_crops=1", "test_crops=2", "image_size=16", "progress=false"]


def test_prepared_crops_are_the_photos_and_read_back_through_the_loader(tmp_path):
    out = tmp_path / "photos"
    done = ldmkit_cli("data", "prepare", "skimage_photos", f"out={out}", *OPTIONS)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert {name: split.num_samples for name, split in manifest.splits.items()} == {"train": 6, "val": 2, "test": 4}
    assert manifest.classes == ["camera", "coffee"] and manifest.image_mode is None  # L and RGB
    assert manifest.facts()["val_split"] == "val" and verify(out) == []
    # each sample is the crop its json names, of the photo its label names, resized
    photos = {"camera": skimage_data.camera(), "coffee": skimage_data.coffee()}
    for split in ("train", "val", "test"):
        for key, sample in read_split(out, split).items():
            meta = json.loads(sample["json"])
            x, y, side = meta["box"]
            photo = photos[manifest.classes[int(sample["cls"])]]
            assert meta["class_name"] == manifest.classes[int(sample["cls"])]
            expected = Image.fromarray(photo[y : y + side, x : x + side]).resize((16, 16), Image.Resampling.LANCZOS)
            np.testing.assert_array_equal(decode(sample["png"]), np.asarray(expected), err_msg=key)
    captions = {"camera": "a man with a camera", "coffee": "a cup of coffee"}
    for split, count in (("train", 6), ("test", 4)):
        cfg = {"source": "skimage_photos", "path": str(out), "image_size": 16, "channels": 3}
        batch = next(iter(build_dataloader(cfg, batch_size=count, split=split)))
        assert batch["image"].shape == (count, 3, 16, 16)
        assert sorted(batch["label"].tolist()) == [0] * (count // 2) + [1] * (count // 2)
        assert [captions[manifest.classes[i]] for i in batch["label"].tolist()] == batch["caption"]


def test_the_seed_decides_the_crops_and_the_same_seed_gives_the_same_bytes(tmp_path):
    options = dict(photos="coffee,camera", crops=3, val_crops=1, test_crops=2, image_size=16, progress=False)

    def shards(seed: int, name: str) -> list[str]:
        manifest = prepare("skimage_photos", tmp_path / name, seed=seed, **options)
        return [s.sha256 for info in manifest.splits.values() for s in info.shards]

    first = shards(0, "a")
    assert shards(0, "b") == first and shards(1, "c") != first


def test_an_unknown_photo_and_a_missing_scikit_image_are_one_line(tmp_path):
    done = ldmkit_cli("data", "prepare", "skimage_photos", f"out={tmp_path / 'a'}", "photos=coffee,lena")
    assert done.returncode == 2 and done.stderr.startswith(
        "ldmkit data prepare: skimage_photos: unknown photo 'lena'; the photos are: astronaut, brick, camera,"
    ), done.stderr
    assert len(done.stderr.splitlines()) == 1
    for nothing in (None, "", []):  # `photos=` on the command line is None
        with pytest.raises(ValueError, match="^skimage_photos: photos= names no photo; the photos are: astronaut,"):
            prepare("skimage_photos", tmp_path / "a", photos=nothing, progress=False)
    hidden = "import sys; sys.modules['skimage'] = None; from ldmkit.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", hidden, "data", "prepare", "skimage_photos", f"out={tmp_path / 'b'}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr) == (
        1,
        "ldmkit data: skimage_photos needs scikit-image, which is not installed: "
        "pip install 'ldmkit[photos]' (or pip install scikit-image)\n",
    )
    assert not (tmp_path / "b").exists()
