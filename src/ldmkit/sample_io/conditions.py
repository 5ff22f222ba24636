"""``ldmkit sample --cond key=value`` (and the demo's condition fields): condition inputs
read by kind.

The conditioner says which keys it reads (``input_keys``) and what each holds
(``input_kinds``); this module turns command-line values into batch entries:

* ``class``: comma-separated class ids or class names (``--cond label=3,5`` or
  ``label=sandal,bag`` -> two samples; the names are :func:`label_names`);
* ``text``: the whole value is one prompt; repeat ``--cond caption=...`` for more;
* ``image``: a PNG path -> C×H×W in [-1, 1] (the first stage's channel count);
* ``segmentation``: a PNG of class ids (mode L or P, values used as they are) -> H×W int64;
* ``mask``: a PNG -> 1×H×W in {0, 1}; white (> 127) is the region to generate, black is kept;
* ``tokens``: comma-separated token ids, one sequence per ``--cond`` (repeat it for more; the
  sequences must have one length) -> B×n int64;
* ``number``: comma-separated finite numbers, one per sample (``--cond brightness=0.2,0.8``)
  -> B float32.

Repeating an image-like key stacks the files (they must have one size). ``--init-image``
and ``--mask`` (img2img and inpainting with any model) are read by :func:`load_image` and
:func:`load_mask`, by the same rules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import LdmkitError

SOURCE_KEY = "__source__"  # key -> the files its values came from, one per sample (messages, settings)
FILE_KINDS = ("image", "segmentation", "mask")


class ConditionArgumentError(LdmkitError, ValueError):
    """A ``--cond`` value that cannot be read (the message names the key and the value)."""


def _load_png(path: Path, kind: str, channels: int, flag: str = "--cond") -> torch.Tensor:
    if path.is_dir():
        raise ConditionArgumentError(f"{flag}: {path} is a folder, not an image file")
    if not path.is_file():
        raise ConditionArgumentError(f"{flag}: no such file {path}")
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:  # PIL signals damage through many types
        raise ConditionArgumentError(f"{flag}: cannot read {path} as an image: {err}") from err
    if kind == "segmentation":
        if image.mode not in ("L", "P", "I", "I;16"):
            raise ConditionArgumentError(
                f"{flag}: {path} is a {image.mode} image; a class map is a one-channel PNG of class ids (mode L or P)"
            )
        return torch.from_numpy(np.array(image, dtype=np.int64))
    # 16-bit, 32-bit and float grayscale: convert() would clip at 255; scaled as training data is
    if image.mode.startswith("I") or image.mode == "F":
        from ldmkit.data.sources.base import normalize_mode

        image = normalize_mode(image)
    if kind == "mask":
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return torch.from_numpy((gray > 127).astype(np.float32))[None]
    # transparent pixels composited on white, as training data is (data.background's default):
    # convert() kept whatever colour a transparent pixel stores (often black)
    from ldmkit.data.transforms import ImageTransform

    array = np.asarray(ImageTransform(image_size=1, channels=channels).to_channels(image), dtype=np.float32)
    tensor = torch.from_numpy(array) / 127.5 - 1.0
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def load_image(path: Path, *, channels: int, flag: str) -> torch.Tensor:
    """A PNG (any mode) -> 1×C×H×W in [-1, 1], C = the first stage's image channels."""
    return _load_png(Path(path).expanduser(), "image", channels, flag)[None]


def load_mask(path: Path, *, flag: str) -> torch.Tensor:
    """A PNG -> 1×1×H×W in {0, 1}: white (> 127) is generated (1), black is kept (0)."""
    return _load_png(Path(path).expanduser(), "mask", 1, flag)[None]


def _integers(key: str, value: str, what: str) -> list[int]:
    """``"3, 5,7"`` -> ``[3, 5, 7]``; anything else names the ``--cond`` item."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConditionArgumentError(f"--cond {key}={value}: expected comma-separated {what}") from None


def _numbers(key: str, value: str) -> list[float]:
    """``"0.5, 2"`` -> ``[0.5, 2.0]`` (kind ``number``); a value that is not a finite number,
    or none at all, names the ``--cond`` item."""
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise ConditionArgumentError(f"--cond {key}={value}: expected comma-separated finite numbers")
    return numbers


def _int64(key: str, value: str, ids: list[int], what: str) -> list[int]:
    """``ids`` when each fits the int64 tensor they become (a larger one is out of any range)."""
    for i in ids:
        if not -(2**63) <= i < 2**63:
            raise ConditionArgumentError(f"--cond {key}={value}: {what} {i} is out of range")
    return ids


def _class_ids(key: str, value: str, names: Sequence[str] | None) -> list[int]:
    """``"3,5"`` or ``"sandal,Bag"`` -> class ids; a name is looked up in ``names`` (exactly,
    else without regard to case where that is unambiguous)."""
    ids = []
    for token in (t.strip() for t in value.split(",")):
        if not token or token.lstrip("-").isdigit():
            ids += _integers(key, token, "integers")
            continue
        if not names:
            raise ConditionArgumentError(
                f"--cond {key}={value}: {token!r} is a class name, but this pipeline has no class names; "
                "give class ids (comma-separated integers)"
            )
        folded = [n for n in names if n.casefold() == token.casefold()]
        if token not in names and len(folded) != 1:
            known = ", ".join(names[:20]) + (f", ... ({len(names)} classes)" if len(names) > 20 else "")
            raise ConditionArgumentError(f"--cond {key}={value}: unknown class name {token!r}; the classes are: {known}")
        ids.append(list(names).index(token if token in names else folded[0]))
    return _int64(key, value, ids, "class id")


def parse_conditions(
    items: Sequence[str],
    kinds: dict[str, str],
    *,
    image_channels: int,
    names: Mapping[str, Sequence[str] | None] | None = None,
) -> dict[str, Any]:
    """``["label=3,5", "caption=a cat"]`` -> a batch; ``kinds`` maps the conditioner's keys
    to their kinds (keys it does not read are an error naming the ones it does); ``names``
    the class names of class keys (:func:`label_names`), for labels given by name."""
    values: dict[str, list[Any]] = {}
    sources: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConditionArgumentError(f"--cond expects key=value, got {item!r}")
        if key not in kinds:
            raise ConditionArgumentError(
                f"--cond {key}=...: the conditioner reads no key {key!r}; it reads {sorted(kinds) or 'nothing'}"
            )
        kind = kinds[key]
        if kind == "class":
            values.setdefault(key, []).extend(_class_ids(key, value, (names or {}).get(key)))
        elif kind == "tokens":
            ids = _int64(key, value, _integers(key, value, "token ids"), "token id")
            if not ids:
                raise ConditionArgumentError(f"--cond {key}=: expected comma-separated token ids, got none")
            values.setdefault(key, []).append(ids)
        elif kind == "number":
            values.setdefault(key, []).extend(_numbers(key, value))
        elif kind in FILE_KINDS:
            path = Path(value).expanduser()
            values.setdefault(key, []).append(_load_png(path, kind, image_channels))
            sources.setdefault(key, []).append(str(path))
        else:  # text and kinds this CLI does not know: the value as it is
            values.setdefault(key, []).append(value)
    batch: dict[str, Any] = {}
    for key, vals in values.items():
        if kinds[key] == "class":
            batch[key] = torch.tensor(vals, dtype=torch.long)
        elif kinds[key] == "tokens":
            lengths = sorted({len(v) for v in vals})
            if len(lengths) > 1:
                raise ConditionArgumentError(
                    f"--cond {key}: the token sequences have different lengths {lengths}; give each the same length"
                )
            batch[key] = torch.tensor(vals, dtype=torch.long)
        elif kinds[key] == "number":
            batch[key] = torch.tensor(vals, dtype=torch.float32)
        elif kinds[key] in FILE_KINDS:
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise ConditionArgumentError(
                    f"--cond {key}: the files {sources[key]} have different sizes {sorted(shapes)}"
                )
            batch[key] = torch.stack(vals)
        else:
            batch[key] = vals
    if sources:
        batch[SOURCE_KEY] = sources
    return batch


def repeat_each(batch: dict[str, Any], keys: Sequence[str], n: int) -> dict[str, Any]:
    """Each condition of ``keys`` repeated ``n`` times in place, ``[a, b]`` -> ``[a]*n + [b]*n``
    (``--num-samples`` per condition)."""
    out = dict(batch)
    for key in keys:
        value = batch[key]
        if isinstance(value, torch.Tensor):
            out[key] = value.repeat_interleave(n, dim=0)
        else:
            out[key] = [v for v in value for _ in range(n)]
    return out


# -- class names -------------------------------------------------------------------------------


def reading_part(conditioner: Any, key: str, attr: str) -> Any:
    """The conditioner that reads batch ``key`` and has ``attr`` set: ``conditioner`` itself
    or, in a composite (``conditioner=multi``), its part; None if there is none."""
    from ldmkit.interfaces import Conditioner

    for module in conditioner.modules():
        if isinstance(module, Conditioner) and key in module.input_keys and getattr(module, attr, None) is not None:
            return module
    return None


def label_names(pipeline: Any, key: str) -> list[str] | None:
    """The names of class key ``key``'s classes, in label order: the conditioner's own
    ``class_names`` (``class_label``), else those of the data it was trained on
    (:func:`data_class_names`); None when neither is known."""
    part = reading_part(pipeline.conditioner, key, "num_classes")
    num_classes = getattr(part, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        return None
    own = getattr(part, "class_names", None)
    return list(own) if own else data_class_names(pipeline.config, num_classes)


def class_names_by_key(pipeline: Any) -> dict[str, list[str] | None]:
    """:func:`label_names` of each class key the pipeline's conditioner reads."""
    conditioner = pipeline.conditioner
    keys = [k for k in conditioner.input_keys if conditioner.input_kind(k) == "class"]
    return {key: label_names(pipeline, key) for key in keys}


def data_class_names(config: Any, num_classes: int, which: str = "classes") -> list[str] | None:
    """The label names of the data a pipeline was trained on: the ``classes`` (or, with
    ``which="segmentation_classes"``, the class-map names) of the prepared dataset's
    ``manifest.json`` (``data.path``), else those of its data source; None when neither has
    exactly ``num_classes`` names."""
    from omegaconf import OmegaConf

    if config is None:
        return None
    names: list[str] = []
    path = OmegaConf.select(config, "data.path", default=None)
    manifest = Path(str(path)).expanduser() / "manifest.json" if path else None
    if manifest is not None and manifest.is_file():
        try:
            names = [str(n) for n in json.loads(manifest.read_text()).get(which) or []]
        except (OSError, ValueError, AttributeError):
            names = []
    source = OmegaConf.select(config, "data.source", default=None)
    if not names and source:
        names = _source_classes(str(source), which)
    return names if len(names) == num_classes else None


def _source_classes(name: str, which: str) -> list[str]:
    """A data source's fixed class list (``which``: ``classes`` or ``segmentation_classes``),
    read without constructing the source (which may look for its files, or download them)."""
    from ldmkit.data.sources import SOURCES

    cls = SOURCES.get(name)
    if cls is None:
        return []
    try:
        return [str(n) for n in getattr(cls.__new__(cls), which)]
    except Exception:  # a source whose classes come from its files: unknown without them
        return []
