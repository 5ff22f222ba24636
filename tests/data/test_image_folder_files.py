"""``image_folder`` on the files people really have: symlinked folders (and a loop), dangling
links, a caption that is not UTF-8, 16-bit PNGs, and a ``val`` split carved out of ``train``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import prepare
from ldmkit.data.sources.image_folder import ImageFolder
from tests.conftest import ldmkit_cli

from .conftest import make_image_folder
from .test_roundtrip import origin_of


def counts(manifest) -> dict[str, int]:
    return {name: split.num_samples for name, split in manifest.splits.items()}


def test_symlinks_are_followed_loops_ended_and_dangling_ones_named(tmp_path):
    """Before: a symlinked class folder was silently left out (rglob does not follow links to
    folders) and a dangling or looping image link silently dropped (``is_file()`` is False)."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    make_image_folder(root, per_class=2)  # cat, dog, owl: 6 images
    make_image_folder(elsewhere, per_class=1)
    os.symlink(elsewhere / "cat", root / "kitten")  # a class folder kept elsewhere
    os.symlink(root, root / "cat" / "again")  # a loop back to the top
    os.symlink(tmp_path / "gone.png", root / "dog" / "dangling.png")
    os.symlink(root / "owl" / "self.png", root / "owl" / "self.png")  # a link to itself
    out = tmp_path / "out"
    done = ldmkit_cli(
        "data",
        "prepare",
        "image_folder",
        f"path={root}",
        f"out={out}",
        "progress=false",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "split train: 7 samples" in done.stdout
    assert "classes (4): cat, dog, kitten, owl" in done.stdout
    assert "note: 2 items could not be loaded and were left out" in done.stdout
    assert any(f"{root}/dog/dangling.png" in line for line in done.stdout.splitlines())
    assert any(f"{root}/owl/self.png" in line for line in done.stdout.splitlines())
    assert "kitten/img_00.png" in origin_of(out).values()


def test_a_folder_that_cannot_be_read_is_noted(tmp_path, monkeypatch):
    """Before: rglob passed over a folder it may not list without a word (root reads any
    folder, so the refusal is simulated)."""
    root = tmp_path / "images"
    make_image_folder(root, per_class=1)
    scandir = os.scandir

    def refusing(path="."):  # os.scandir for every caller (shutil.rmtree passes a descriptor)
        if not isinstance(path, int) and Path(path).name == "owl":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("ldmkit.data.sources.image_folder.os.scandir", refusing)
    manifest = prepare("image_folder", tmp_path / "out", path=str(root), progress=False)
    assert counts(manifest) == {"train": 2}
    assert manifest.notes == [f"folder {root}/owl could not be read: Permission denied"]


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root, per_class=1)
    (root / "cat" / "img_00.txt").write_bytes(b"caf\xe9")
    manifest = prepare("image_folder", tmp_path / "out", path=str(root), progress=False)
    assert counts(manifest) == {"train": 2}
    (note,) = [n for n in manifest.notes if "img_00" in n]
    assert f"{root}/cat/img_00.png: its caption img_00.txt is not UTF-8" in note


@pytest.mark.parametrize("top", [200, 65535])
def test_16_bit_gray_is_scaled_by_its_bit_depth_not_its_brightest_pixel(tmp_path, top):
    """Before: a dark 16-bit PNG (all values <= 255) kept its values as 8-bit ones, 257x too
    bright, while a bright one was scaled; PIL scales 16-bit RGB PNGs by 257 either way."""
    root = tmp_path / "images"
    root.mkdir()
    values = np.linspace(0, top, 16).astype(np.uint16).reshape(4, 4)
    Image.fromarray(values).save(root / "depth.png")
    assert Image.open(root / "depth.png").mode == "I;16"
    sample = ImageFolder(path=str(root)).load(root / "depth.png")
    assert sample.image.mode == "L"
    np.testing.assert_array_equal(np.asarray(sample.image), np.round(values / 257).astype(np.uint8))


@pytest.mark.parametrize(
    ("values", "white"),
    [
        (np.linspace(0, 1, 16, dtype=np.float32), 1.0),  # a float image in [0, 1]: was nearly black
        (np.linspace(0, 200, 16, dtype=np.float32), 255.0),  # float with 8-bit values
        (np.linspace(0, 2**31 - 1, 16).astype(np.int32), 2**31 - 1),  # 32-bit integer: was white
    ],
    ids=["float-unit", "float-8-bit", "int32"],
)
def test_32_bit_gray_is_scaled_by_its_range(tmp_path, values, white):
    """Before: mode F and I images went through "a value above 255 means 16-bit": a float
    TIFF in [0, 1] came out black (0 or 1 of 255), a full-range 32-bit one white."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(values.reshape(4, 4)).save(root / "scan.tiff")
    sample = ImageFolder(path=str(root)).load(root / "scan.tiff")
    assert sample.image.mode == "L"
    expected = np.round(values.astype(np.float64).reshape(4, 4) * (255.0 / white)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(sample.image), expected)


def test_a_val_split_carved_out_of_train_is_written_and_replaced_with_it(tmp_path):
    """Before: ``split=train val_fraction=F`` wrote train without the carved items and no val
    (F of the images silently gone), and rewriting train with ``val_fraction=0`` kept the old
    val, whose images were then in train as well."""
    root = tmp_path / "images"
    make_image_folder(root, per_class=4)  # 12 images
    out = tmp_path / "out"
    manifest = prepare(
        "image_folder", out, path=str(root), split="train", val_fraction=0.25, progress=False
    )
    assert counts(manifest) == {"val": 3, "train": 9}
    manifest = prepare("image_folder", out, path=str(root), overwrite=True, progress=False)
    assert counts(manifest) == {"train": 12}
    assert not list(out.glob("val-*")) and manifest.facts()["val_split"] is None


def test_val_fraction_that_leaves_no_train_item_says_so(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "only.png")
    with pytest.raises(
        ValueError, match=r"^val_fraction=0.05 leaves no train item: source 'image_folder' has 1$"
    ):
        prepare("image_folder", tmp_path / "out", path=str(root), val_fraction=0.05, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_rewrite_that_fails_leaves_the_dataset_as_it_was(tmp_path):
    """Before: ``overwrite=true`` deleted the old split before writing the new one, so a
    rewrite that failed (here: every file damaged since) lost the dataset. Now the new splits
    are staged and replace the old ones only once whole; a killed run's staging is removed."""
    from ldmkit.data import read_manifest, verify
    from ldmkit.data.errors import DataError

    root = tmp_path / "images"
    make_image_folder(root, per_class=2)
    out = tmp_path / "out"
    before = counts(prepare("image_folder", out, path=str(root), progress=False))
    shards = sorted(p.name for p in out.glob("*.tar"))
    (out / ".staging-killed").mkdir()  # what a preparation killed mid-way leaves
    for image in root.rglob("*.png"):
        image.write_bytes(b"not a png any more")
    with pytest.raises(DataError, match="none of 6 items could be loaded"):
        prepare("image_folder", out, path=str(root), overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == shards
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert verify(out) == [] and before == {"train": 6}
    assert counts(read_manifest(out)) == before


def test_jfif_and_avif_are_read_and_other_files_are_counted_in_a_note(tmp_path):
    """Before: ``.jfif`` (a JPEG), ``.avif`` and a phone's ``.heic`` were passed over without a
    word; now PIL reads the first two and the rest are counted by suffix (captions aside)."""
    root = tmp_path / "images"
    make_image_folder(root, per_class=1)  # cat, dog, owl
    Image.new("RGB", (8, 8), "red").save(root / "cat" / "photo.jfif", format="JPEG")
    Image.new("RGB", (8, 8), "blue").save(root / "dog" / "photo.avif", format="AVIF")
    (root / "dog" / "photo.txt").write_text("a blue dog")
    (root / "owl" / "IMG_0001.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "owl" / "IMG_0002.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "README").write_text("my photos")
    manifest = prepare("image_folder", tmp_path / "out", path=str(root), progress=False)
    assert counts(manifest) == {"train": 5}
    assert manifest.notes == ["3 files without an image suffix were left out: (no suffix) (1), .heic (2)"]


def test_what_pil_warns_while_loading_names_the_file(tmp_path):
    """Before: ``UserWarning: Corrupt EXIF data ...`` went to stderr naming no file; now the
    item is kept and the warning is a note naming it."""
    import io

    root = tmp_path / "images"
    make_image_folder(root, per_class=1)
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buffer, "JPEG", exif=exif)  # its EXIF is cut short
    (root / "dog" / "odd.jpg").write_bytes(buffer.getvalue())
    manifest = prepare("image_folder", tmp_path / "out", path=str(root), progress=False)
    assert counts(manifest) == {"train": 4}
    assert manifest.notes == [
        "1 items were kept with a warning",
        f"train item {root}/dog/odd.jpg: Corrupt EXIF data.  Expecting to read 12 bytes but only got 10. ",
    ]


def _sigkill_before_call(n: int) -> None:
    """Make this process SIGKILL itself before its n-th ``os.replace`` or ``os.unlink``."""
    import signal

    calls = 0

    def killing(call):
        def wrapper(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)

        return wrapper

    os.replace, os.unlink = killing(os.replace), killing(os.unlink)


def test_a_rewrite_killed_before_any_rename_or_deletion_leaves_the_old_or_the_new_dataset(tmp_path):
    """Before: the rewrite dropped the old splits from the manifest, deleted their shards, moved
    the new ones in under the same names and only then wrote the new manifest: a process killed
    in between left the split absent, or a manifest listing shards whose bytes had changed.
    Here a real (forked) process is SIGKILLed before its n-th rename or deletion, for every n:
    each time the folder holds the old dataset or the new one, whole, and the next preparation
    leaves nothing but the new shards, under their plain names, and the manifest."""
    import shutil

    from ldmkit.data import read_manifest, verify

    root = tmp_path / "images"
    make_image_folder(root, per_class=3)  # 9 images
    pristine = tmp_path / "pristine"
    old = counts(prepare("image_folder", pristine, path=str(root), shard_size=2, progress=False))
    for image in sorted(root.rglob("img_02.*")):  # the rewrite has 6 images, another shard count
        image.unlink()
    new = {"train": 6}
    out = tmp_path / "out"
    outcomes = []
    for n in range(1, 100):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out)
        pid = os.fork()
        if pid == 0:  # the child
            try:
                _sigkill_before_call(n)
                prepare("image_folder", out, path=str(root), shard_size=2, overwrite=True, progress=False)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        state = counts(read_manifest(out))
        assert state in (old, new), (n, state)
        assert verify(out) == [], (n, verify(out))
        outcomes.append(state == new)
        if not killed:
            break
        prepare("image_folder", out, path=str(root), shard_size=2, overwrite=True, progress=False)
        listed = {s.name for info in read_manifest(out).splits.values() for s in info.shards}
        assert sorted(p.name for p in out.iterdir()) == sorted(listed | {"manifest.json"}), n
    assert not killed and outcomes[0] is False and outcomes[-1] is True and len(outcomes) > 10
    shards = [s.name for s in read_manifest(out).splits["train"].shards]
    assert shards == sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]


def test_images_outside_the_class_folders_are_counted_in_a_note(tmp_path):
    """Before: an image directly under DIR (label -1) was prepared without a word, and
    ``experiment=folder_class`` stopped at it in whichever step drew it."""
    root = tmp_path / "images"
    make_image_folder(root, per_class=1)  # cat, dog, owl
    for name in ("loose.png", "stray.png"):
        Image.new("RGB", (8, 8), "red").save(root / name)
    manifest = prepare("image_folder", tmp_path / "out", path=str(root), progress=False)
    assert manifest.notes == [
        "2 images lie directly under the folder, outside the class folders: their label is -1 (no "
        "class), which a class-conditional run (experiment=folder_class) stops at; move them into a "
        "class folder, or train without labels (experiment=folder_uncond or folder_text)"
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8), "red").save(flat / "one.png")  # no classes at all: nothing to say
    assert prepare("image_folder", tmp_path / "out_flat", path=str(flat), progress=False).notes == []


def test_the_images_themselves_as_data_path_say_how_to_prepare_them(tmp_path):
    """``data=image_folder data.path=~/photos`` (the photos, not shards) suggested
    ``ldmkit data prepare image_folder out=~/photos``, which fails: it has no ``path=``."""
    from ldmkit.data.errors import SourceNotFoundError
    from ldmkit.data.manifest import read_manifest

    make_image_folder(tmp_path / "photos", per_class=1)
    with pytest.raises(SourceNotFoundError) as err:
        read_manifest(tmp_path / "photos", source="image_folder")
    shards = f"{tmp_path / 'photos'}_shards"
    assert str(err.value) == (
        f"no prepared dataset at {tmp_path / 'photos'} (manifest.json is missing): it holds the images themselves, "
        f"and training reads them as prepared shards. Prepare them with: ldmkit data prepare image_folder "
        f"path={tmp_path / 'photos'} out={shards}, then give data.path={shards}"
    )
    with pytest.raises(SourceNotFoundError) as err:  # an empty or missing folder: the images are elsewhere
        read_manifest(tmp_path / "empty", source="image_folder")
    assert str(err.value).endswith(f"Prepare it with: ldmkit data prepare image_folder path=YOUR_IMAGES out={tmp_path / 'empty'}")
    out = ldmkit_cli("data", "prepare", "image_folder", f"path={tmp_path / 'photos'}", f"out={shards}")
    assert out.returncode == 0, out.stderr  # the command given works
