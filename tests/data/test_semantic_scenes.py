"""Semantic scenes: seeded, and the class map is exactly the pasted cut-outs' alpha."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldmkit.data import DataError, SourceNotFoundError, build_dataloader, prepare, read_manifest
from ldmkit.data.sources.semantic_scenes import short_name


def make_cutouts(root: Path) -> dict[str, Image.Image]:
    """Three RGBA cut-outs with soft (anti-aliased) alpha edges, so the 128 threshold matters."""
    root.mkdir(parents=True)
    shapes = {}
    for name, color, draw_shape in (
        ("red_disc", (220, 30, 30), lambda d: d.ellipse((4, 4, 36, 36), fill=255)),
        ("green_tri", (30, 200, 60), lambda d: d.polygon([(2, 38), (20, 2), (38, 38)], fill=255)),
        (
            "blue_cross",
            (40, 60, 230),
            lambda d: (
                d.rectangle((14, 2, 26, 38), fill=255),
                d.rectangle((2, 14, 38, 26), fill=255),
            ),
        ),
    ):
        mask = Image.new("L", (160, 160))
        big = ImageDraw.Draw(mask)
        draw_shape(_Scaled(big, 4))
        alpha = mask.resize((40, 40), Image.Resampling.BOX)  # soft edges
        rgb = np.zeros((40, 40, 3), np.uint8) + np.array(color, np.uint8)
        rgb[::4] //= 2  # stripes, so a flip or an offset would show in the pixels
        image = Image.fromarray(np.dstack([rgb, np.asarray(alpha)]))
        image.save(root / f"{name}.png")
        shapes[name.replace("_", " ")] = image
    return shapes


class _Scaled:
    """ImageDraw with coordinates multiplied (draw at 4x, box-filter down for soft edges)."""

    def __init__(self, draw, k):
        self.draw, self.k = draw, k

    def ellipse(self, box, fill):
        self.draw.ellipse([v * self.k for v in box], fill=fill)

    def rectangle(self, box, fill):
        self.draw.rectangle([v * self.k for v in box], fill=fill)

    def polygon(self, points, fill):
        self.draw.polygon([(x * self.k, y * self.k) for x, y in points], fill=fill)


def read_split(directory: Path, split: str = "train") -> dict[str, dict]:
    samples = {}
    for path in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def scenes(tmp_path):
    cutouts = make_cutouts(tmp_path / "cutouts")
    options = dict(cutouts="folder", path=str(tmp_path / "cutouts"), num_classes=4,
                   num_samples=12, val_samples=3, image_size=48, progress=False)  # fmt: skip
    manifest = prepare("semantic_scenes", tmp_path / "a", seed=3, shard_size=5, **options)
    return tmp_path, cutouts, options, manifest


def test_map_is_the_union_of_pasted_alpha(scenes):
    tmp_path, cutouts, _, manifest = scenes
    names = manifest.segmentation_classes
    assert names[0] == "background" and sorted(names[1:]) == sorted(cutouts)
    samples = read_split(tmp_path / "a")
    assert len(samples) == 12
    for key, members in samples.items():
        image, seg = decode(members["png"]), decode(members["seg.png"])
        meta = json.loads(members["json"])
        expected_seg = np.zeros((48, 48), np.uint8)
        expected_rgb = np.zeros((48, 48, 3), np.uint8)
        for obj in meta["objects"]:
            x, y, w, h = obj["box"]
            assert 0 <= x and x + w <= 48 and 0 <= y and y + h <= 48
            cut = cutouts[names[obj["class"]]]
            # a cut-out is used cropped to the box of its alpha >= 128 pixels
            opaque = np.asarray(cut)[:, :, 3] >= 128
            rows, cols = np.flatnonzero(opaque.any(1)), np.flatnonzero(opaque.any(0))
            box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            placed = cut.crop(box).resize((w, h), Image.Resampling.LANCZOS)
            if obj["flip"]:
                placed = placed.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            rgba = np.asarray(placed)
            mask = rgba[:, :, 3] >= 128
            expected_seg[y : y + h, x : x + w][mask] = obj["class"]
            expected_rgb[y : y + h, x : x + w][mask] = rgba[:, :, :3][mask]
        np.testing.assert_array_equal(seg, expected_seg, err_msg=key)
        objects = seg > 0
        assert objects.any()
        np.testing.assert_array_equal(image[objects], expected_rgb[objects], err_msg=key)
        assert meta["caption"].startswith("a scene with ")


def test_scenes_are_reproducible_from_the_seed(scenes):
    tmp_path, _, options, manifest = scenes
    same = prepare("semantic_scenes", tmp_path / "b", seed=3, shard_size=5, **options)
    other = prepare("semantic_scenes", tmp_path / "c", seed=4, shard_size=5, **options)
    digests = lambda m: [s.sha256 for split in m.splits.values() for s in split.shards]  # noqa: E731
    assert digests(same) == digests(manifest)
    assert digests(other) != digests(manifest)
    # scene i does not depend on how many scenes were asked for
    fewer = prepare("semantic_scenes", tmp_path / "d", seed=3, limit=4, **options)
    assert fewer.splits["train"].num_samples == 4
    full, part = read_split(tmp_path / "a"), read_split(tmp_path / "d")
    for key in part:
        assert part[key] == full[key]


def test_loader_batches_segmentation_with_the_image(scenes):
    tmp_path, _, _, _ = scenes
    cfg = {"source": "semantic_scenes", "path": str(tmp_path / "a"), "image_size": 32,
           "flip": True, "crop": "random"}  # fmt: skip
    loader = build_dataloader(cfg, batch_size=4, split="val")
    (batch,) = list(loader)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["segmentation"].shape == (3, 32, 32) and batch["segmentation"].dtype.is_signed
    assert batch["label"].tolist() == [-1, -1, -1]
    assert int(batch["segmentation"].max()) <= 3 and all(
        c.startswith("a scene") for c in batch["caption"]
    )
    # where the map says background, the pixel is not a cut-out colour: check one object pixel
    # survived the nearest resize with its class
    assert (batch["segmentation"] > 0).any()


def test_scenes_from_installed_tuxpaint(tmp_path):
    try:
        manifest = prepare(
            "semantic_scenes", tmp_path / "t", num_samples=3, val_samples=0, num_classes=5,
            image_size=32, progress=False,
        )  # fmt: skip
    except SourceNotFoundError:
        pytest.skip("neither tuxpaint stamps nor emoji are installed")
    assert len(manifest.segmentation_classes) == 5
    assert read_manifest(tmp_path / "t").splits["train"].num_samples == 3


def test_class_names_from_stamp_descriptions():
    assert short_name("A frog.") == "frog"
    assert short_name("Earth. Our planet!") == "earth"
    assert short_name("\u201cT-intersection\u201d") == "t-intersection"
    assert short_name("The U.S. flag") == "u.s. flag"


@pytest.mark.parametrize(
    "description, name",
    [
        ("A \u201cFuji\u201d apple.", "fuji apple"),
        ("A \u201cStop\u201d sign.", "stop sign"),
        ("Boom!!", "boom"),
        ("A knight\u2019s helmet.", "knight\u2019s helmet"),
    ],
)
def test_class_names_leave_out_quotes_and_marks(description, name):
    """Before: "\u201cfuji\u201d apple" and "boom!!" became class names and scene captions ("a
    scene with \u201cfuji\u201d apple")."""
    assert short_name(description) == name


def test_an_object_named_twice_is_an_error(tmp_path):
    """Before: two classes of the same cut-out ("red disc" twice), so the map could not tell
    them apart."""
    make_cutouts(tmp_path / "cutouts")
    with pytest.raises(DataError, match="objects= names 'red disc' twice"):
        prepare("semantic_scenes", tmp_path / "o", cutouts="folder", path=str(tmp_path / "cutouts"),
                objects="red disc,green tri,red disc", progress=False)  # fmt: skip


def test_objects_and_a_num_classes_that_disagree_is_an_error(tmp_path):
    """Before: ``objects=`` silently overrode ``num_classes`` (3 classes written where 8 were
    asked for, and the manifest's options still said num_classes=8). Now a num_classes that
    does not count the named objects plus the background is one line; one that does, or none,
    prepares, and the manifest records the count written."""
    make_cutouts(tmp_path / "cutouts")
    options = [f"path={tmp_path / 'cutouts'}", "cutouts=folder", "objects=red disc,green tri",
               "num_samples=2", "val_samples=0", "image_size=16", "progress=false"]  # fmt: skip
    from tests.conftest import ldmkit_cli

    out = ldmkit_cli("data", "prepare", "semantic_scenes", f"out={tmp_path / 'a'}", "num_classes=8", *options)
    assert out.returncode == 2 and out.stderr.strip() == (  # a usage error, as other bad options
        "ldmkit data prepare: semantic_scenes: objects= names 2 cut-outs (red disc, green tri), so "
        "num_classes is 3 with the background, not 8; leave num_classes out or set it to 3"
    ), out.stderr
    assert not (tmp_path / "a").exists()
    for given in ([], ["num_classes=3"]):
        out = ldmkit_cli("data", "prepare", "semantic_scenes", f"out={tmp_path / 'b'}", "overwrite=true", *given, *options)
        assert out.returncode == 0, out.stderr
        manifest = read_manifest(tmp_path / "b")
        assert manifest.segmentation_classes == ["background", "red disc", "green tri"]
        assert manifest.options["num_classes"] == 3


def test_a_semantic_map_takes_its_class_count_from_the_manifest(tmp_path):
    """Before: ``${manifest:...}`` knew class labels only, so ``conditioner.num_classes`` of a
    semantic map had to be written to match the ``num_classes`` the data was prepared with.
    Now ``${manifest:num_segmentation_classes}`` reads it (``conditioner=semantic_map_manifest``),
    and data without class maps is one line."""
    from omegaconf import OmegaConf

    from ldmkit.config import ConfigError, compose_config

    make_cutouts(tmp_path / "cutouts")
    prepare("semantic_scenes", tmp_path / "scenes", cutouts="folder", path=str(tmp_path / "cutouts"),
            objects="red disc,green tri", num_samples=2, val_samples=0, image_size=16, progress=False)  # fmt: skip
    cfg = compose_config(["data=semantic_scenes", f"data.path={tmp_path / 'scenes'}",
                          "conditioner=semantic_map_manifest"])  # fmt: skip
    assert OmegaConf.to_container(cfg.conditioner, resolve=True)["num_classes"] == 3
    prepare("image_folder", tmp_path / "photos", path=str(tmp_path / "cutouts"), progress=False)
    with pytest.raises(ConfigError, match=r"data.path=.*photos: the dataset has no class maps \(segmentation"):
        compose_config(["data=image_folder", f"data.path={tmp_path / 'photos'}", "conditioner=semantic_map_manifest"])
