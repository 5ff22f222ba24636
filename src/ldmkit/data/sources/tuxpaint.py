"""Tux Paint's stamp collection (Debian ``tuxpaint-stamps-default``): cut-out PNGs with captions.

Each ``<name>.png`` has a ``<name>.txt`` whose first line is the English description ("A
frog."); ``<name>_mirror.png`` variants share their original's text. The label is the top-level
category folder (animals, food, vehicles, ...). Stamps are fitted into a square transparent
canvas of ``image_size`` pixels. SVG-only stamps are left out (no rasterizer is required).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ldmkit.config_checks import Integer
from ldmkit.data.errors import SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample, fit_to_square

DEBIAN_DIR = "/usr/share/tuxpaint/stamps"


def stamp_caption(png: Path) -> str:
    """The stamp's English description; ``ValueError`` when its .txt is not UTF-8."""
    stem = png.stem[: -len("_mirror")] if png.stem.endswith("_mirror") else png.stem
    text = png.with_name(f"{stem}.txt")
    if text.is_file():
        try:
            content = text.read_text(encoding="utf-8-sig")  # a BOM is no part of the caption
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"its caption {text.name} is not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        for line in content.splitlines():
            if line.strip() and ".utf8=" not in line:
                return line.strip()
    return stem.replace("_", " ").replace("-", " ")


def find_stamps(explicit: str | None) -> Path:
    directory = Path(explicit or DEBIAN_DIR).expanduser()
    if directory.is_dir() and any(directory.rglob("*.png")):
        return directory
    if explicit:
        raise SourceNotFoundError(f"tuxpaint: no stamp PNGs under {directory}")
    raise SourceNotFoundError(
        f"tuxpaint: the stamps are not installed ({DEBIAN_DIR} is missing). Install them with "
        f"`apt-get install --no-install-recommends tuxpaint-stamps-default`, or pass path= to a "
        f"folder of stamp PNGs with their .txt descriptions."
    )


class TuxPaint(Source):
    name = "tuxpaint"
    description = "Tux Paint stamps: RGBA cut-outs, caption = description, label = category"
    # min_size: leave out stamps whose longer side is smaller (they would only blur when scaled)
    options = {"path": None, "image_size": 128, "min_size": 32}
    option_specs = {"min_size": Integer(0)}
    has_captions = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.root = find_stamps(self.config["path"])
        self._paths = sorted(self.root.rglob("*.png"))
        self._classes = sorted({self._category(p) for p in self._paths})
        self._svg_only = sum(
            1 for svg in self.root.rglob("*.svg") if not svg.with_suffix(".png").exists()
        )
        self._too_small: list[str] = []

    def _category(self, path: Path) -> str:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else "uncategorized"

    def items(self, split: str) -> Sequence[Any]:
        return list(self._paths)

    def load_cutout(self, path: Path) -> Image.Image:
        """The stamp as an RGBA image at its own size."""
        with Image.open(path) as opened:
            return opened.convert("RGBA")

    def load(self, path: Path) -> SourceSample:
        image = self.load_cutout(path)
        if max(image.size) < int(self.config["min_size"]):
            self._too_small.append(path.relative_to(self.root).as_posix())
            raise ValueError(f"stamp {path} is only {image.size[0]}x{image.size[1]} pixels")
        if self.config["image_size"]:
            image = fit_to_square(image, int(self.config["image_size"]))
        category = self._category(path)
        return SourceSample(
            image=image,
            label=self._classes.index(category),
            caption=stamp_caption(path),
            meta={"class_name": category, "origin": path.relative_to(self.root).as_posix()},
        )

    def notes(self) -> list[str]:
        notes = [f"stamps from {self.root}"]
        if self._svg_only:
            notes.append(f"{self._svg_only} SVG-only stamps left out (no SVG rasterizer)")
        return notes
