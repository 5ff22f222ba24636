"""The built-in sources' options, checked the way a user meets them: a wrong ``path=`` or an
out-of-range option is one line naming it, never another package's data or a traceback."""

from __future__ import annotations

import gzip
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldmkit.data import DataError, SourceNotFoundError, prepare, verify
from ldmkit.data.sources.emoji import Emoji
from tests.conftest import ldmkit_cli
from tests.data.conftest import write_idx
from tests.data.test_semantic_scenes import make_cutouts, read_split

EMOJI = [  # (image, name, category, subcategory, shape)
    ("1f438.png", "FROG FACE", "Animals & Nature", "animal-amphibian", "disc"),
    ("1f34e.png", "RED APPLE", "Food & Drink", "food-fruit", "oval"),
    ("1f697.png", "AUTOMOBILE", "Travel & Places", "transport-ground", "triangle"),
]


def make_emoji_package(root: Path) -> Path:
    """A tiny emoji-datasource-google: emoji.json, categories.json, package.json, 64x64 PNGs."""
    images = root / "img" / "google" / "64"
    images.mkdir(parents=True)
    entries = []
    for order, (image, name, category, subcategory, shape) in enumerate(EMOJI):
        canvas = Image.new("RGBA", (64, 64))
        draw = ImageDraw.Draw(canvas)
        box = (8, 8, 56, 56)
        if shape == "disc":
            draw.ellipse(box, fill=(30, 200, 60, 255))
        elif shape == "oval":
            draw.ellipse((12, 20, 52, 44), fill=(220, 30, 30, 255))
        else:
            draw.polygon([(8, 56), (32, 8), (56, 56)], fill=(40, 60, 230, 255))
        canvas.save(images / image)
        entries.append({"image": image, "name": name, "short_name": name.lower().replace(" ", "_"),
                        "category": category, "subcategory": subcategory, "sort_order": order,
                        "has_img_google": True})  # fmt: skip
    (root / "emoji.json").write_text(json.dumps(entries))
    (root / "categories.json").write_text(
        json.dumps({c: [] for c in sorted({e[2] for e in EMOJI})})
    )
    (root / "package.json").write_text(
        json.dumps({"name": "emoji-datasource-google", "version": "0"})
    )
    return root


def test_emoji_path_that_is_not_the_package_is_an_error(tmp_path, monkeypatch):
    """Before: a wrong path= was passed over for the package found elsewhere, silently."""
    monkeypatch.setenv("LDMKIT_EMOJI_DIR", str(make_emoji_package(tmp_path / "pkg")))
    assert len(Emoji().items("train")) == 3  # found through the environment
    with pytest.raises(SourceNotFoundError, match=f"emoji: {tmp_path / 'typo'} is not the"):
        Emoji(path=str(tmp_path / "typo"))


def test_scenes_auto_with_an_emoji_package_path_use_the_emoji(tmp_path):
    """Before: cutouts=auto tried the path as Tux Paint stamps first, and any folder of PNGs is
    one: the classes were named after the emoji files ("1f438")."""
    package = make_emoji_package(tmp_path / "pkg")
    manifest = prepare("semantic_scenes", tmp_path / "out", path=str(package), num_classes=4,
                       num_samples=2, val_samples=0, image_size=16, progress=False)  # fmt: skip
    assert sorted(manifest.segmentation_classes) == [
        "automobile",
        "background",
        "frog face",
        "red apple",
    ]
    assert manifest.notes[0].startswith("cut-outs from emoji:")


@pytest.mark.parametrize(
    "source, option, message",
    [
        ("semantic_scenes", {"image_size": None}, "image_size=null: expected an integer >= 1"),
        ("semantic_scenes", {"max_objects": 0}, "max_objects=0: expected an integer >= 1"),
        ("semantic_scenes", {"num_samples": 0}, "num_samples=0: expected an integer >= 1"),
        ("semantic_scenes", {"val_samples": -1}, "val_samples=-1: expected an integer >= 0"),
        ("cutouts", {"image_size": None}, "image_size=null: expected an integer >= 1"),
        ("cutouts", {"holdout": 0.9}, "holdout=0.9: expected a number > 0 and <= 0.5"),
        ("tuxpaint", {"min_size": -1}, "min_size=-1: expected an integer >= 0"),
        (
            "fashion_mnist",
            {"download": "maybe"},
            "download='maybe': expected true or false or one of auto",
        ),
    ],
)
def test_source_options_out_of_range_name_the_option(tmp_path, source, option, message):
    """Before: image_size=null was "int() argument must be ... not 'NoneType'", max_objects=0
    failed every item with "low >= high", val_samples=-1 dropped the val split silently, holdout=0.9 held out 1/2 and
    download=maybe was taken as false."""
    with pytest.raises(ValueError, match=f"{message} \\(source '{source}'\\)"):
        prepare(source, tmp_path / "out", progress=False, **option)


def test_cli_source_after_options_says_the_source_comes_first(tmp_path):
    """Before: "expected key=value, got 'fashion_mnist'" (the option was taken as the source)."""
    out = ldmkit_cli("data", "prepare", f"out={tmp_path / 'o'}", "fashion_mnist", "limit=2")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"ldmkit data prepare: 'out={tmp_path / 'o'}' is an option, not a source: name the "
        "source first (ldmkit data prepare SOURCE key=value ...; `ldmkit data sources` lists them)"
    )


def test_cli_a_folder_as_the_source_points_to_image_folder(tmp_path):
    """Before: "unknown data source '...'" and the list of sources, for the folder of images a
    newcomer gives first; now the command that prepares it."""
    folder = tmp_path / "my images"
    folder.mkdir()
    out = ldmkit_cli("data", "prepare", str(folder), f"out={tmp_path / 'o'}")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"ldmkit data prepare: {str(folder)!r} is a folder, not a source: a folder of images is the "
        f"image_folder source (ldmkit data prepare image_folder path={shlex.quote(str(folder))} ...)"
    )
    assert not (tmp_path / "o").exists()


def test_fashion_mnist_val_fraction_is_drawn_by_the_seed(tmp_path, fake_fashion_mnist):
    """Before: a source that keeps its own order (fashion_mnist) gave the first IDX items as
    val whatever the seed, though val_fraction carves "a seeded val split"."""
    directory, _ = fake_fashion_mnist

    def origins(seed: int, split: str) -> list[str]:
        out = tmp_path / f"seed{seed}"
        prepare("fashion_mnist", out, path=str(directory), split="train", val_fraction=0.2,
                seed=seed, overwrite=True, progress=False)  # fmt: skip
        dataset = read_split(out, split)
        return [json.loads(sample["json"])["origin"] for sample in dataset.values()]

    val = origins(0, "val")
    assert len(val) == 6 and val == origins(0, "val")
    assert val != origins(1, "val") and val != [f"train[{i}]" for i in range(6)]
    train = origins(0, "train")
    assert sorted(val + train) == sorted(f"train[{i}]" for i in range(30))
    assert train == sorted(train, key=lambda o: int(o[6:-1]))  # the rest keeps the IDX order


def test_rewriting_one_split_with_other_classes_is_refused(tmp_path):
    """Before: rewriting val with another num_classes (or seed, or path) kept the old train
    split but gave the manifest the new class names: train's maps silently meant other things."""
    make_cutouts(tmp_path / "cutouts")
    options = dict(cutouts="folder", path=str(tmp_path / "cutouts"), num_samples=3, val_samples=2,
                   image_size=16, progress=False)  # fmt: skip
    out = tmp_path / "out"
    before = prepare("semantic_scenes", out, num_classes=3, **options)
    manifest_bytes = (out / "manifest.json").read_bytes()
    with pytest.raises(
        DataError,
        match="split .train. of semantic_scenes, kept .* other segmentation classes .*split=all overwrite=true",
    ):
        prepare("semantic_scenes", out, split="val", num_classes=4, overwrite=True, **options)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert not list(out.glob(".staging-*"))
    # the same classes: the other split is kept, as documented
    after = prepare("semantic_scenes", out, split="val", num_classes=3, overwrite=True, **options)
    assert after.segmentation_classes == before.segmentation_classes
    assert after.splits["train"] == before.splits["train"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda gz: gz.write_bytes(gz.read_bytes()[:300]), "is damaged: Compressed file ended"),
        (lambda gz: gz.write_bytes(b"garbage"), "is damaged: Not a gzipped file"),
        (lambda gz: gz.write_bytes(gzip.compress(b"x")), "is damaged: 1 bytes, too short"),
    ],
    ids=["truncated", "not-gzip", "too-short"],
)
def test_damaged_fashion_mnist_file_is_one_line(tmp_path, fake_fashion_mnist, damage, message):
    """Before: tracebacks (EOFError, BadGzipFile, struct.error) from a cut-off download."""
    directory, _ = fake_fashion_mnist
    images = directory / "train-images-idx3-ubyte.gz"
    damage(images)
    out = ldmkit_cli("data", "prepare", "fashion_mnist", f"path={directory}", f"out={tmp_path / 'o'}",
                     "progress=false")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"ldmkit data prepare: fashion_mnist: {images} {message}")
    assert out.stderr.count("\n") == 1


def test_fashion_mnist_label_beyond_the_classes_is_one_line(tmp_path, fake_fashion_mnist):
    """Before: IndexError out of load() (a label file of another dataset, e.g. EMNIST's)."""
    directory, arrays = fake_fashion_mnist
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, np.full(10, 12, np.uint8))
    with pytest.raises(
        DataError, match=f"fashion_mnist: {labels} has label 12; Fashion-MNIST has 10"
    ):
        prepare("fashion_mnist", tmp_path / "o", path=str(directory), progress=False)


def test_a_rewrite_that_fails_after_writing_keeps_the_dataset(tmp_path, monkeypatch):
    """Before: the old split was dropped from the manifest before the new manifest was made,
    so a source whose notes() failed (emoji without its package.json) left "splits": {}."""
    package = make_emoji_package(tmp_path / "pkg")
    out = tmp_path / "out"
    prepare("emoji", out, path=str(package), progress=False)
    manifest_bytes = (out / "manifest.json").read_bytes()

    def broken_notes(self):
        raise OSError("notes failed")

    monkeypatch.setattr(Emoji, "notes", broken_notes)
    with pytest.raises(OSError, match="notes failed"):
        prepare("emoji", out, path=str(package), shard_size=1, overwrite=True, progress=False)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert verify(out) == [] and sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "train-000000.tar",
    ]


def test_emoji_package_without_package_json(tmp_path):
    """Before: FileNotFoundError (a traceback) after every shard was written."""
    package = make_emoji_package(tmp_path / "pkg")
    (package / "package.json").unlink()
    manifest = prepare("emoji", tmp_path / "out", path=str(package), progress=False)
    assert manifest.notes[0] == f"emoji-datasource-google ? from {package}"


@pytest.mark.parametrize(
    "content, reason",
    [("nope", "JSONDecodeError"), ('[{"image": "1f438.png"}]', "KeyError: 'category'"),
     ('{"a": 1}', "TypeError")],
)  # fmt: skip
def test_damaged_emoji_list_is_one_line(tmp_path, content, reason):
    """Before: a traceback (KeyError) or a line naming no file ("Expecting value: ...")."""
    package = make_emoji_package(tmp_path / "pkg")
    (package / "emoji.json").write_text(content)
    with pytest.raises(DataError, match=f"emoji: {package / 'emoji.json'} is not .*{reason}"):
        prepare("emoji", tmp_path / "out", path=str(package), progress=False)


def test_stamp_description_not_utf8_is_left_out_and_named(tmp_path):
    """As docs/data.md says of every source: an item whose caption is not UTF-8 is left out
    and named. Before: the stamp was kept with U+FFFD in its caption; a BOM stayed in it."""
    stamps = tmp_path / "stamps" / "animals"
    stamps.mkdir(parents=True)
    for name, text in (("frog", "\ufeffA frog.\nfr.utf8=Une grenouille.\n".encode()),
                       ("cafe", "A caf\xe9 cat.\n".encode("latin-1"))):  # fmt: skip
        image = Image.new("RGBA", (40, 40))
        ImageDraw.Draw(image).ellipse((4, 4, 36, 36), fill=(30, 200, 60, 255))
        image.save(stamps / f"{name}.png")
        (stamps / f"{name}.txt").write_bytes(text)
    manifest = prepare("tuxpaint", tmp_path / "out", path=str(stamps.parent), progress=False)
    assert manifest.splits["train"].num_samples == 1
    (sample,) = read_split(tmp_path / "out").values()
    assert sample["txt"].decode() == "A frog."
    assert any(
        "cafe.txt is not UTF-8 (invalid continuation byte at byte 5)" in n for n in manifest.notes
    )
    # the scenes take their class names from the same descriptions: the cafe is no candidate
    scenes = prepare("semantic_scenes", tmp_path / "scenes", cutouts="tuxpaint", num_classes=2,
                     path=str(stamps.parent), num_samples=1, val_samples=0, progress=False)  # fmt: skip
    assert scenes.segmentation_classes == ["background", "frog"]


def test_a_second_prepare_of_the_same_folder_stops_while_the_first_writes(tmp_path):
    """Before: the second deleted the first one's staging folder as left by a killed run, so
    the first failed with a FileNotFoundError traceback (or the two manifests overwrote each
    other). Now the second stops with one line and touches nothing."""
    package = make_emoji_package(tmp_path / "pkg")
    out = tmp_path / "out"
    started = subprocess.Popen(  # a first preparation that holds its staging folder's lock
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from ldmkit.data import prepare
            from ldmkit.data.sources.emoji import Emoji
            load = Emoji.load
            def slow(self, item):
                print("writing", flush=True); time.sleep(30); return load(self, item)
            Emoji.load = slow
            prepare("emoji", {str(out)!r}, path={str(package)!r}, progress=False)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert started.stdout.readline() == "writing\n"
        (staging,) = out.glob(".staging-*")
        with pytest.raises(DataError, match="another `ldmkit data prepare` is writing .*out now"):
            prepare("emoji", out, path=str(package), progress=False)
        assert staging.is_dir() and list(out.iterdir()) == [staging]
    finally:
        started.kill()
        started.wait()
    # killed, it holds no lock: the next preparation clears its folder and writes
    prepare("emoji", out, path=str(package), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar"]
