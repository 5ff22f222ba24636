"""Google's Noto emoji from the npm package ``emoji-datasource-google`` (iamcal/emoji-data).

64x64 RGBA images; caption = the emoji's Unicode name ("grinning face"), label = its category
("Smileys & Emotion", ...). The package is looked up in ``path=``, ``$LDMKIT_EMOJI_DIR``,
``./.cache/npm/node_modules``, and ``npm root -g`` (only in ``path=`` when it is given).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.data.sources.base import Source, SourceSample

PACKAGE = "emoji-datasource-google"
# skin-tone and hair swatches: parts of emoji, not emoji
EXCLUDED_CATEGORIES = {"Component"}


def candidate_dirs() -> list[Path]:
    """Where the package is looked for when no path= is given, in order."""
    candidates = []
    if os.environ.get("LDMKIT_EMOJI_DIR"):
        candidates.append(Path(os.environ["LDMKIT_EMOJI_DIR"]).expanduser())
    candidates.append(Path.cwd() / ".cache" / "npm" / "node_modules" / PACKAGE)
    candidates.append(Path.cwd() / "node_modules" / PACKAGE)
    # an editable install (src layout): the repository's own npm cache, whatever the cwd
    repo_root = Path(__file__).resolve().parents[4]
    if (repo_root / "pyproject.toml").is_file():
        candidates.append(repo_root / ".cache" / "npm" / "node_modules" / PACKAGE)
    npm = shutil.which("npm")
    if npm:
        try:
            root = subprocess.run(
                [npm, "root", "-g"], capture_output=True, text=True, timeout=20, check=True
            ).stdout.strip()
            if root:
                candidates.append(Path(root) / PACKAGE)
        except (OSError, subprocess.SubprocessError):
            pass
    return candidates


def is_package(directory: Path) -> bool:
    return (directory / "emoji.json").is_file() and (directory / "img" / "google" / "64").is_dir()


def find_package(explicit: str | None = None) -> Path:
    """The package folder: ``explicit`` (path=) and no other when given, else the first of
    :func:`candidate_dirs` that holds it."""
    if explicit:
        directory = Path(explicit).expanduser()
        if is_package(directory):
            return directory
        raise SourceNotFoundError(
            f"emoji: {explicit} is not the {PACKAGE} package (no emoji.json + img/google/64/)"
        )
    candidates = candidate_dirs()
    for directory in candidates:
        if is_package(directory):
            return directory
    raise SourceNotFoundError(
        f"emoji: the npm package {PACKAGE} is not installed (looked in "
        f"{', '.join(str(c) for c in candidates)}). Install it with "
        f"`npm install --prefix .cache/npm {PACKAGE}` (or `npm install -g {PACKAGE}`), "
        f"or set LDMKIT_EMOJI_DIR / pass path= to the package folder."
    )


class Emoji(Source):
    name = "emoji"
    description = f"emoji from npm {PACKAGE}: 64x64 RGBA, caption = name, label = category"
    # skin_tones: also the five skin-tone variants of people emoji
    options = {"path": None, "skin_tones": False}
    has_captions = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.package = find_package(self.config["path"])
        self.image_dir = self.package / "img" / "google" / "64"
        index = self.package / "emoji.json"
        try:  # a hand-made or damaged copy of the package: one line naming the file
            self._read_index(index)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"emoji: {index} is not {PACKAGE}'s emoji list ({type(exc).__name__}: {exc})"
            ) from None

    def _read_index(self, index: Path) -> None:
        entries = json.loads(index.read_text(encoding="utf-8"))
        order_file = self.package / "categories.json"
        order = list(json.loads(order_file.read_text())) if order_file.is_file() else []
        categories = {e["category"] for e in entries} - EXCLUDED_CATEGORIES
        self._classes = [c for c in order if c in categories] + sorted(categories - set(order))
        self._items = []
        self._missing = 0
        for entry in sorted(entries, key=lambda e: e.get("sort_order", 0)):
            if entry["category"] in EXCLUDED_CATEGORIES:
                continue
            variants = [(entry, entry)]
            if self.config["skin_tones"]:
                variants += [(entry, v) for v in (entry.get("skin_variations") or {}).values()]
            for base, variant in variants:
                if not variant.get("has_img_google", False):
                    continue
                if not (self.image_dir / variant["image"]).is_file():
                    self._missing += 1
                    continue
                self._items.append(
                    {
                        "image": variant["image"],
                        "name": (base.get("name") or base["short_name"]).lower(),
                        "short_name": base["short_name"],
                        "category": base["category"],
                        "subcategory": base.get("subcategory", ""),
                    }
                )

    def items(self, split: str) -> Sequence[Any]:
        return list(self._items)

    def load(self, item: dict[str, str]) -> SourceSample:
        with Image.open(self.image_dir / item["image"]) as opened:
            image = opened.convert("RGBA")
        return SourceSample(
            image=image,
            label=self._classes.index(item["category"]),
            caption=item["name"],
            meta={
                "class_name": item["category"],
                "subcategory": item["subcategory"],
                "short_name": item["short_name"],
                "origin": item["image"],
            },
        )

    def notes(self) -> list[str]:
        try:  # a copy of the package's files may lack it
            version = json.loads((self.package / "package.json").read_text()).get("version", "?")
        except (OSError, ValueError, AttributeError):
            version = "?"
        notes = [f"{PACKAGE} {version} from {self.package}"]
        if self._missing:
            notes.append(f"{self._missing} emoji listed without an image file were left out")
        return notes
