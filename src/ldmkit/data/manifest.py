"""``manifest.json``: what a prepared dataset folder holds (splits, shards, counts, checksums)."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.data.shards import ShardInfo

MANIFEST = "manifest.json"
FORMAT = "ldmkit-webdataset"
VERSION = 1


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    """The description ``ldmkit data prepare`` writes next to the shards.

    ``fields`` names the tar member extensions every sample has (``png`` always; ``cls``,
    ``txt``, ``seg.png``, ``json`` where the source provides them). ``classes`` are the label
    names (index = label), ``segmentation_classes`` the class-map names (index 0 = background).
    """

    source: str
    fields: list[str]
    splits: dict[str, SplitInfo]
    classes: list[str] = field(default_factory=list)
    segmentation_classes: list[str] = field(default_factory=list)
    image_mode: str | None = None  # PIL mode shared by all images, None when mixed
    image_size: list[int] | None = None  # [width, height] shared by all images, None when mixed
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created_by: str = ""

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise DataError(
                f"split {name!r} is not in this dataset ({self.source}); "
                f"it has: {', '.join(sorted(self.splits)) or '(none)'}"
            ) from None

    def facts(self) -> dict[str, Any]:
        """What a config reads from the dataset (``${manifest:KEY}``, docs/configuration.md):
        ``num_classes`` and ``class_names`` (from ``classes``), ``num_segmentation_classes``
        (of the class maps, background included), ``val_split`` (``val`` if prepared, else
        ``test``, else None: no validation) and ``channels`` (1 when every image is gray, L or
        LA; else 3)."""
        held_out = [name for name in ("val", "test") if name in self.splits]
        return {
            "num_classes": len(self.classes),
            "class_names": list(self.classes),
            "num_segmentation_classes": len(self.segmentation_classes),
            "val_split": held_out[0] if held_out else None,
            "channels": 1 if self.image_mode in ("L", "LA") else 3,
        }

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
        if not isinstance(data, dict):
            raise DataError(
                f"{where} is not an ldmkit shard manifest (a JSON {_json_type(data)}, not an object)"
            )
        if data.get("format") != FORMAT:
            raise DataError(
                f"{where} is not an ldmkit shard manifest (format {data.get('format')!r})"
            )
        shape = _shape_problem(data)
        if shape:
            raise DataError(f"{where} is malformed: {shape}")
        if data.get("version", 0) > VERSION:
            raise DataError(
                f"{where} has manifest version {data['version']}; this ldmkit reads up to {VERSION}"
            )
        try:
            splits = {
                name: SplitInfo(
                    num_samples=int(split["num_samples"]),
                    shards=[ShardInfo(**shard) for shard in split["shards"]],
                )
                for name, split in data["splits"].items()
            }
            kwargs = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "splits"}
            return cls(splits=splits, **kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where} is malformed: {exc!r}") from exc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    return names.get(type(value), "object")


# what each key of manifest.json holds, beyond splits: a hand-written or foreign manifest
# that differs is one line naming the key, not a TypeError somewhere later
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,), "source": (str,), "fields": (list,), "classes": (list,),
    "segmentation_classes": (list,), "image_mode": (str, type(None)),
    "image_size": (list, type(None)), "options": (dict,), "notes": (list,), "created_by": (str,),
}  # fmt: skip


def _shape_problem(data: dict[str, Any]) -> str | None:
    """The first key of a manifest's JSON that has the wrong type, as a phrase; None if none."""
    for key, types in _KEY_TYPES.items():
        value = data.get(key, types[0]())  # absent: its default
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(_json_type(t()) for t in types)
            return f"'{key}' is {_json_type(value)}, expected {expected}"
    splits = data.get("splits")
    if not isinstance(splits, dict):
        return f"'splits' is {_json_type(splits)}, not an object of splits"
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"'splits' entry {name!r} is not an object with a list of 'shards'"
    return None


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.partial")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _holds_images(directory: Path) -> bool:
    """Whether ``directory`` or one of its sub-folders holds an image file (a look at a few
    dozen entries, not a walk)."""
    from ldmkit.data.sources.image_folder import IMAGE_SUFFIXES  # the suffixes that source reads

    try:
        for entry in itertools.islice(directory.iterdir(), 64):
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                return True
            if entry.is_dir() and any(e.suffix.lower() in IMAGE_SUFFIXES for e in itertools.islice(entry.iterdir(), 64)):
                return True
    except OSError:
        return False
    return False


def read_manifest(directory: str | os.PathLike, *, source: str | None = None) -> Manifest:
    """Load ``<directory>/manifest.json``; a missing one says how to prepare the dataset."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = source or "<source>"
        if source == "image_folder" and _holds_images(Path(directory)):  # the photos themselves
            shards = f"{str(directory).rstrip('/')}_shards"
            raise SourceNotFoundError(
                f"no prepared dataset at {directory} ({MANIFEST} is missing): it holds the images themselves, and "
                f"training reads them as prepared shards. Prepare them with: ldmkit data prepare image_folder "
                f"path={directory} out={shards}, then give data.path={shards}"
            )
        images = "path=YOUR_IMAGES " if source == "image_folder" else ""
        raise SourceNotFoundError(
            f"no prepared dataset at {directory} ({MANIFEST} is missing). "
            f"Prepare it with: ldmkit data prepare {hint} {images}out={directory}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return Manifest.from_json(data, str(path))
