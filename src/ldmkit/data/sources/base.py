"""What a dataset source provides to ``ldmkit data prepare``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from ldmkit.config_checks import Boolean, Integer, Number, Spec, problem


def is_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: a file name whose bytes were not UTF-8 comes
    back from the file system with surrogate escapes (``os.fsdecode``), which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with the bytes of a non-UTF-8 file name shown as ``\\xNN`` (``caf\\xe9.png``),
    so it can be printed and written to UTF-8 files."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


@dataclass
class SourceSample:
    """One sample as a source produces it, before it is encoded into a shard."""

    image: Image.Image
    label: int = -1
    caption: str | None = None
    segmentation: Image.Image | None = None  # mode L, values = class ids, 0 = background
    meta: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """A dataset source: lists cheap item references per split and loads one item at a time.

    Subclasses declare ``options`` (name -> default); the constructor accepts exactly those, so
    a misspelled ``key=value`` on the command line is an error, not silently ignored.
    ``items`` is called once per split; ``load`` may raise ``OSError``/``ValueError`` (or PIL's
    ``DecompressionBombError``) for a broken item, which preparation skips and records in the
    manifest's notes.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    # what an option takes where its default does not say enough (a range, a choice); the
    # others are checked by the type of their default
    option_specs: ClassVar[dict[str, Spec]] = {}
    has_labels: ClassVar[bool] = True
    has_captions: ClassVar[bool] = False
    has_segmentation: ClassVar[bool] = False
    # shuffle item order before writing, so a shard mixes classes (the shuffle buffer at load
    # time only mixes within a window)
    shuffle_items: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown option {unknown[0]!r} for source {self.name!r}; "
                f"expected one of: {', '.join(sorted(self.options)) or '(none)'}"
            )
        problems = [
            problem(key, value, spec.expected)
            for key, value in options.items()
            if (spec := self._option_spec(key)) is not None and not spec.accepts(value)
        ]
        if problems:
            raise ValueError(f"{'; '.join(problems)} (source {self.name!r})")
        self.config = {**self.options, **options}

    def _option_spec(self, key: str) -> Spec | None:
        """What option ``key`` takes: the source's ``option_specs``, else by its default: an
        integer (``image_size``: >= 1, or null where a source keeps the size), a number, true
        or false; None (not checked here) for others."""
        if key in self.option_specs:
            return self.option_specs[key]
        default = self.options[key]
        if key == "image_size":
            return Integer(1, null=True)
        if isinstance(default, bool):
            return Boolean()
        if isinstance(default, int):
            return Integer()
        return Number() if isinstance(default, float) else None

    # set by sources with class labels (sub-folder names, categories)
    _classes: Sequence[str] = ()

    @property
    def splits(self) -> list[str]:
        """The splits the source has by nature (e.g. train and test); one by default."""
        return ["train"]

    @abstractmethod
    def items(self, split: str) -> Sequence[Any]:
        """Cheap references to the samples of ``split`` (indices, paths)."""

    @abstractmethod
    def load(self, item: Any) -> SourceSample:
        """Load one item."""

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def segmentation_classes(self) -> list[str]:
        return []

    def notes(self) -> list[str]:
        """Remarks for the manifest (what was left out and why)."""
        return []


def normalize_mode(image: Image.Image) -> Image.Image:
    """Bring any PIL image to L, LA, RGB or RGBA (keeping transparency where there is any)."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "PA":
        return image.convert("RGBA")
    if image.mode in ("1",):
        return image.convert("L")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit grayscale: keep the top 8 bits, as PIL does for 16-bit RGB. The others carry
        # no bit depth, so their range decides: float in [0, 1] (the usual float image) as
        # [0, 1]; else up to 255 as 8-bit, up to 65535 as 16-bit, beyond as 32-bit
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F" and low >= 0.0 and high <= 1.0:
            top = 1.0
        else:
            # float beyond int32: its own maximum is white
            top = next((t for t in (255.0, 65535.0, 2.0**31 - 1) if high <= t), high)
        return Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype("uint8"))
    return image.convert("RGB")


def fit_to_square(image: Image.Image, size: int) -> Image.Image:
    """Scale an RGBA cut-out to fit a ``size`` x ``size`` transparent canvas, centred."""
    image = image.convert("RGBA")
    scale = size / max(image.size)
    width = max(1, round(image.width * scale))
    height = max(1, round(image.height * scale))
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas
