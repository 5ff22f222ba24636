"""Any folder tree of images: the class from the first sub-folder, a caption from a sidecar .txt.

    root/cat/001.jpg  root/cat/001.txt ("a cat on a sofa")  root/dog/x.png  root/loose.png

gives classes ["cat", "dog"] (sorted), and label -1 for images directly under the root.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from ldmkit.data.errors import SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample, is_utf8, normalize_mode, printable

IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif",
}  # fmt: skip
SIDECAR_SUFFIXES = {".txt"}  # captions: neither images nor files left out


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    if scale >= 1:
        return image  # never upsample at preparation; the loader resizes at train time
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(target, Image.Resampling.LANCZOS)


def image_files(root: Path, unreadable: list[str], others: Counter[str]) -> Iterator[Path]:
    """The files under ``root`` with an image suffix, hidden names left out. Symlinked folders
    are followed (a link back to a folder it lies in is not); a dangling or looping link is
    listed, so that loading it names it; a folder that cannot be listed goes to ``unreadable``,
    and ``others`` counts the other files by suffix."""

    def is_folder(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()  # follows a link
        except OSError:  # a link to itself
            return False

    def walk(folder: Path, ancestors: frozenset[str]) -> Iterator[Path]:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            unreadable.append(f"folder {folder} could not be read: {exc.strerror}")
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if is_folder(entry):
                real = os.path.realpath(path)
                if real not in ancestors:
                    yield from walk(path, ancestors | {real})
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                yield path
            elif path.suffix.lower() not in SIDECAR_SUFFIXES:
                others[path.suffix.lower() or "(no suffix)"] += 1

    yield from walk(root, frozenset({os.path.realpath(root)}))


class ImageFolder(Source):
    name = "image_folder"
    description = "a folder tree of images (class = sub-folder, caption = sidecar .txt)"
    # image_size: shrink so the shorter side is at most this many pixels (None keeps the size)
    options = {"path": None, "image_size": None}
    has_captions = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.config["path"] is None:
            raise SourceNotFoundError(
                "image_folder needs path=DIR: a folder of images, one sub-folder per class "
                "(captions optional, in a .txt file beside each image)"
            )
        self.root = Path(self.config["path"]).expanduser()
        if not self.root.is_dir():
            raise SourceNotFoundError(f"image_folder: {self.root} is not a folder")
        self._unreadable: list[str] = []
        self._others: Counter[str] = Counter()
        self.paths = sorted(image_files(self.root, self._unreadable, self._others))
        if not self.paths:
            raise SourceNotFoundError(
                f"image_folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}"
            )
        self._classes = sorted(
            {
                p.relative_to(self.root).parts[0]
                for p in self.paths
                if len(p.relative_to(self.root).parts) > 1
                and is_utf8(str(p.relative_to(self.root)))
            }
        )

    def notes(self) -> list[str]:
        notes = [printable(note) for note in self._unreadable]
        if self._others:  # e.g. .heic from a phone: PIL needs a plugin for it; convert first
            kinds = ", ".join(f"{suffix} ({n})" for suffix, n in sorted(self._others.items()))
            count = sum(self._others.values())
            notes.append(printable(f"{count} files without an image suffix were left out: {kinds}"))
        loose = sum(len(p.relative_to(self.root).parts) == 1 for p in self.paths)
        if loose and self._classes:
            notes.append(
                f"{loose} images lie directly under the folder, outside the class folders: their label "
                "is -1 (no class), which a class-conditional run (experiment=folder_class) stops at; move "
                "them into a class folder, or train without labels (experiment=folder_uncond or folder_text)"
            )
        return notes

    def items(self, split: str) -> Sequence[Any]:
        return list(self.paths)

    def load(self, path: Path) -> SourceSample:
        relative = path.relative_to(self.root)
        if not is_utf8(str(relative)):  # its name could be neither kept nor written as metadata
            raise ValueError("its name is not UTF-8; rename it (e.g. convmv -f latin1 -t utf8)")
        with Image.open(path) as opened:
            opened.load()
            image = normalize_mode(ImageOps.exif_transpose(opened))
        if self.config["image_size"]:
            image = resize_shorter_side(image, int(self.config["image_size"]))
        label = self._classes.index(relative.parts[0]) if len(relative.parts) > 1 else -1
        sidecar = path.with_suffix(".txt")
        try:
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"its caption {sidecar.name} is not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        meta = {"origin": relative.as_posix()}
        if label >= 0:
            meta["class_name"] = self._classes[label]
        return SourceSample(image=image, label=label, caption=caption, meta=meta)
