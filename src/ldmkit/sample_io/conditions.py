"""``ldmkit sample --cond key=value`` (and the demo's condition fields): condition inputs
read by kind.

The conditioner says which keys it reads (``input_keys``) and what each holds
(``input_kinds``); this module turns command-line values into batch entries:

* ``class``: comma-separated integers (``--cond label=3,5`` -> two samples);
* ``text``: the whole value is one prompt; repeat ``--cond caption=...`` for more;
* ``image``: a PNG path -> C×H×W in [-1, 1] (the first stage's channel count);
* ``segmentation``: a PNG of class ids (mode L or P, values used as they are) -> H×W int64;
* ``mask``: a PNG -> 1×H×W in {0, 1}; white (> 127) is the region to generate, black is kept;
* ``tokens``: comma-separated token ids, one sequence per ``--cond`` (repeat it for more; the
  sequences must have one length) -> B×n int64.

Repeating an image-like key stacks the files (they must have one size). ``--init-image``
and ``--mask`` (img2img and inpainting with any model) are read by :func:`load_image` and
:func:`load_mask`, by the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import LdmkitError

SOURCE_KEY = "__source__"  # key -> the file(s) a value came from, for error messages
FILE_KINDS = ("image", "segmentation", "mask")


class ConditionArgumentError(LdmkitError, ValueError):
    """A ``--cond`` value that cannot be read (the message names the key and the value)."""


def _load_png(path: Path, kind: str, channels: int, flag: str = "--cond") -> torch.Tensor:
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
    if kind == "mask":
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return torch.from_numpy((gray > 127).astype(np.float32))[None]
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
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


def parse_conditions(
    items: Sequence[str], kinds: dict[str, str], *, image_channels: int
) -> dict[str, Any]:
    """``["label=3,5", "caption=a cat"]`` -> a batch; ``kinds`` maps the conditioner's keys
    to their kinds (keys it does not read are an error naming the ones it does)."""
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
            values.setdefault(key, []).extend(_integers(key, value, "integers"))
        elif kind == "tokens":
            ids = _integers(key, value, "token ids")
            if not ids:
                raise ConditionArgumentError(f"--cond {key}=: expected comma-separated token ids, got none")
            values.setdefault(key, []).append(ids)
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
        batch[SOURCE_KEY] = {k: ", ".join(v) for k, v in sources.items()}
    return batch


def repeat_to(batch: dict[str, Any], keys: Sequence[str], n: int) -> dict[str, Any]:
    """Every key holding one value repeated to ``n`` samples (``--num-samples`` with one condition)."""
    out = dict(batch)
    for key in keys:
        value = batch[key]
        if len(value) == 1:
            out[key] = value.expand(n, *value.shape[1:]).clone() if isinstance(value, torch.Tensor) else list(value) * n
    return out
