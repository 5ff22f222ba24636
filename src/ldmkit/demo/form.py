"""What the demo page asks for, and how its answers become one ``Pipeline.sample`` call.

No Gradio here: the page (:mod:`ldmkit.demo.app`) draws one widget per
:class:`ConditionField` and hands the values to :func:`prepare`, which reads them the way
``ldmkit sample`` does (the same readers, :mod:`ldmkit.sample_io.conditions`) into the
:class:`~ldmkit.sampling_request.SampleRequest` that checks them (as it checks the command
line's), with one-line :class:`DemoInputError` messages, so that the settings a result shows,
and the command line that goes with them, reproduce it.
"""

from __future__ import annotations

import contextlib
import math
import re
import shlex
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ldmkit.errors import LdmkitError
from ldmkit.sampling_request import SEED_LIMIT, SampleRequest, message, whole_number

MAX_IMAGES = 16  # per request: a shared page must not let one user hold the model for long
MAX_CHECKS = 2  # input checks running at once (each may decode a few images of max_side² pixels)


class DemoInputError(LdmkitError, ValueError):
    """A value on the page that cannot be used; the message is one line, shown as it is."""


# -- the inputs a pipeline asks for --------------------------------------------------------


@dataclass(frozen=True)
class ConditionField:
    """One condition input of the page: the conditioner's batch ``key`` and its ``kind``.

    ``choices`` lists ``(shown name, class id)`` for a class key whose number of classes is
    known, ``names`` the class names of a segmentation key's ids. ``mask_key`` names the mask
    an image field paints (an inpainting conditioner reads an image and a mask: the page
    shows one editor for both); ``painted_by`` is set on that mask field, which then only
    offers an optional upload. ``negative`` names the field's negative input on the page,
    where it has one (a class to steer away from, a negative prompt): the page labels it so,
    and its messages name it so.
    """

    key: str
    kind: str
    label: str
    choices: tuple[tuple[str, int], ...] = ()
    num_classes: int | None = None
    names: tuple[str, ...] = ()  # a class map's class names (index = id), where known
    mask_key: str | None = None
    painted_by: str | None = None
    negative: str | None = None


def condition_fields(pipeline: Any) -> list[ConditionField]:
    """The page's condition inputs, in the conditioner's ``input_keys`` order; a class key's
    choices show the class names where known (:func:`~ldmkit.sample_io.conditions.label_names`)."""
    from ldmkit.sample_io.conditions import data_class_names, label_names

    conditioner = pipeline.conditioner
    kinds = {key: conditioner.input_kind(key) for key in conditioner.input_keys}
    images = [k for k, kind in kinds.items() if kind == "image"]
    masks = [k for k, kind in kinds.items() if kind == "mask"]
    paired = (images[0], masks[0]) if len(images) == 1 and len(masks) == 1 else None

    def negative(key: str, name: str) -> str:  # the key too, where two keys have its kind
        return name if list(kinds.values()).count(kinds[key]) == 1 else f"{name} ({key})"

    fields = []
    for key, kind in kinds.items():
        num_classes = _num_classes(conditioner, key)
        if kind == "class":
            names = label_names(pipeline, key)
            choices = tuple(
                (f"{i}: {names[i]}" if names else str(i), i) for i in range(num_classes or 0)
            )
            shown = negative(key, "steer away from class")
            fields.append(
                ConditionField(key, kind, f"{key} (class)", choices, num_classes, negative=shown)
            )
        elif kind == "text":
            fields.append(
                ConditionField(key, kind, f"{key} (prompt)", negative=negative(key, "negative prompt"))
            )
        elif kind == "tokens":
            fields.append(ConditionField(key, kind, f"{key} (token ids, comma-separated)"))
        elif kind == "number":
            fields.append(ConditionField(key, kind, f"{key} (a number)"))
        elif kind == "segmentation":
            what = f"ids 0..{num_classes - 1}" if num_classes else "class ids"
            label = f"{key} (a one-channel PNG of {what})"
            names = (
                data_class_names(pipeline.config, num_classes, "segmentation_classes")
                if num_classes
                else None
            )
            fields.append(
                ConditionField(key, kind, label, num_classes=num_classes, names=tuple(names or ()))
            )
        elif paired and key == paired[0]:
            label = f"{key} (upload, then paint the region to generate)"
            fields.append(ConditionField(key, kind, label, mask_key=paired[1]))
        elif paired and key == paired[1]:
            label = f"{key} (optional: a PNG, white = generate; replaces the painted region)"
            fields.append(ConditionField(key, kind, label, painted_by=paired[0]))
        elif kind == "mask":
            fields.append(ConditionField(key, kind, f"{key} (a PNG, white = generate)"))
        else:  # image, and kinds this page does not know: an image upload
            fields.append(ConditionField(key, kind, f"{key} (image)"))
    return fields


def _num_classes(conditioner: Any, key: str) -> int | None:
    """``num_classes`` of the conditioner (or the composite's part) that reads ``key``."""
    from ldmkit.sample_io.conditions import reading_part

    n = getattr(reading_part(conditioner, key, "num_classes"), "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


def sampler_options() -> list[str]:
    """The ``sampler=NAME`` options ``ldmkit sample`` accepts (ldmkit's and the plugins')."""
    from ldmkit.config import config_dir
    from ldmkit.plugins import get_plugin_manager, root_directory

    roots = [config_dir()] + [root_directory(r) for r in get_plugin_manager().config_roots()]
    return sorted(
        {p.stem for root in roots if root is not None for p in (root / "sampler").glob("*.yaml")}
    )


# -- one request -----------------------------------------------------------------------------

# how the page names the sampling arguments in messages (ldmkit.sampling_request.message)
PAGE_NAMES = {
    "guidance_scale": "guidance scale",
    "num_samples": "number of images",
    "init_image": "the start image",
}


@dataclass
class PageRequest:
    """The page's values as they arrive (numbers may be floats or None, files are paths)."""

    sampler: str
    steps: Any
    guidance_scale: Any
    seed: Any
    randomize_seed: bool = False
    num_images: Any = 1
    height: Any = None
    width: Any = None
    conditions: Mapping[str, Any] = field(default_factory=dict)
    init_image: str | None = None  # a PNG path (or the painted editor's background, saved)
    mask: str | None = None  # a PNG path, white = repaint
    strength: Any = 1.0  # the page's default; None (an emptied box) is refused
    # key -> its negative (a prompt, a class), one for every image; empty or None: none
    negative: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A checked page request: the :class:`~ldmkit.sampling_request.SampleRequest`
    ``Pipeline.sample`` runs (validated against the pipeline), and what the settings record."""

    request: SampleRequest
    # "--cond key" / "--init-image" / "--mask" -> the file it read, by its name among the
    # downloads (inputs/KEY.png): a result never shows a path on the server
    sources: dict[str, str]
    kinds: dict[str, str]
    items: list[str]  # the --cond KEY=VALUE items (files by their names, as in sources)
    num_images: int
    size: tuple[int, int] | None  # the height and width asked for (None: the default)
    negative_items: list[str] = field(default_factory=list)  # KEY=VALUE, as --negative-cond


def prepare(
    pipeline: Any,
    page: PageRequest,
    *,
    inputs_dir: Path,
    rng: Any = None,
    fields: Sequence[ConditionField] | None = None,
    sampler: Any = None,
) -> Prepared:
    """Check the ``page``'s values against ``pipeline`` and read its files; copies of the files
    go to ``inputs_dir`` (offered for download with the result, by the names its command line
    and settings give them). The sampling arguments are checked by the
    :class:`~ldmkit.sampling_request.SampleRequest` they make (as ``ldmkit sample`` checks
    them), within the page's limits (:data:`MAX_IMAGES` images, :func:`max_side`). An image is
    refused from its header, before it is decoded, when a side is over :func:`max_side`.
    ``rng`` (a ``random.Random``) draws the seed when ``randomize_seed`` is set; ``fields``
    are the pipeline's :func:`condition_fields`, when already known; ``sampler`` is the one
    the request will run, checked (for img2img, masks) in place of the pipeline's own, which
    is the last request's."""
    from ldmkit.sample_io.conditions import (
        SOURCE_KEY,
        ConditionArgumentError,
        load_image,
        load_mask,
        parse_conditions,
        repeat_each,
    )

    if page.randomize_seed:
        import random

        seed = (rng or random.SystemRandom()).randrange(SEED_LIMIT - MAX_IMAGES)  # seed + i fits too
    else:
        seed = _required(page.seed, "seed")
    guidance = _required(page.guidance_scale, "guidance scale", "a number >= 0")
    with _page_names():
        request = SampleRequest(
            steps=_required(page.steps, "steps"), guidance_scale=guidance, seed=seed,
            num_samples=whole_number(page.num_images, "num_samples", 1, MAX_IMAGES),
            size=_size(pipeline, page.height, page.width),
        )  # fmt: skip
    limit = max_side(pipeline)

    conditioner = pipeline.conditioner
    kinds = {key: conditioner.input_kind(key) for key in conditioner.input_keys}
    specs = {f.key: f for f in (fields if fields is not None else condition_fields(pipeline))}
    items: list[str] = []
    uploaded: dict[str, str] = {}  # the copy's path -> the name the user uploaded
    batch: dict[str, Any] = {}
    sources: dict[str, str] = {}
    channels = pipeline.first_stage.image_channels
    for key, kind in kinds.items():
        value = page.conditions.get(key)
        spec = specs[key]
        read = None  # the item as read, where it names a kept file (its path on the server)
        if kind == "class":
            item = f"{key}={_class_id(value, spec)}"
        elif kind == "text":
            prompt = "" if value is None else str(value).strip()
            if not prompt:
                raise DemoInputError(f"{key}: the prompt is empty; type what the image should show")
            item = f"{key}={prompt}"
        elif kind == "tokens":
            item = f"{key}={'' if value is None else str(value).strip()}"
        elif kind == "number":
            item = f"{key}={'' if value is None else str(value).strip()}"
        else:
            if value is None or value == "":
                what = (
                    "a class map"
                    if kind == "segmentation"
                    else "a mask"
                    if kind == "mask"
                    else "an image"
                )
                raise DemoInputError(f"{key}: upload {what}")
            kept = _keep(Path(value), inputs_dir, key, uploaded, name=key, limit=limit)
            item, read = f"{key}={kept.name}", f"{key}={kept}"
            sources[f"--cond {key}"] = kept.name
        items.append(item)
        try:  # one key at a time, so that a message names the key it is about
            part = parse_conditions([read or item], {key: kind}, image_channels=channels)
        except ConditionArgumentError as err:
            raise DemoInputError(f"{key}: {_page_message(str(err), uploaded)}") from None
        part.pop(SOURCE_KEY, None)
        batch.update(part)
    init_image = mask = None
    try:
        if page.init_image is not None:
            path = _keep(
                Path(page.init_image),
                inputs_dir,
                "init_image",
                uploaded,
                name="start image",
                limit=limit,
            )
            init_image = load_image(path, channels=channels, flag="start image")
            sources["--init-image"] = path.name
        if page.mask is not None:
            path = _keep(Path(page.mask), inputs_dir, "mask", uploaded, name="mask", limit=limit)
            mask = load_mask(path, flag="mask")
            sources["--mask"] = path.name
    except ConditionArgumentError as err:
        raise DemoInputError(_page_message(str(err), uploaded)) from None
    if conditioner.input_keys:  # one condition for every image
        batch = repeat_each(batch, conditioner.input_keys, request.num_samples)
    negative, negative_items, names = {}, [], []
    for key, kind in kinds.items():  # one value for every image, read as --negative-cond reads it
        spec, value = specs[key], page.negative.get(key)
        if spec.negative is None or value is None or not str(value).strip():
            continue  # none: guidance steers from the null condition
        value = _class_id(value, spec, spec.negative) if kind == "class" else str(value).strip()
        negative_items.append(f"{key}={value}")
        names.append(spec.negative)
        negative.update(parse_conditions([negative_items[-1]], {key: kind}, image_channels=channels))
    asked = request.size
    strength = None
    if init_image is not None:
        strength = _required(page.strength, "strength", "a number in (0, 1]")
    with _page_names({"negative": " and ".join(names)}):
        request = replace(
            request, batch=batch, negative=negative or None, init_image=init_image, mask=mask,
            strength=strength,
        ).validate(
            pipeline if sampler is None else _Sampling(pipeline, sampler),
            max_samples=MAX_IMAGES, max_side=limit,
        )  # fmt: skip
    return Prepared(
        request, sources, kinds, items, request.num_samples, asked, negative_items=negative_items
    )


class _Sampling:
    """``pipeline`` with ``sampler`` in its place, for a request's validation (which reads
    the pipeline), leaving the pipeline as it is: checks run beside a sampling."""

    def __init__(self, pipeline: Any, sampler: Any) -> None:
        self._pipeline, self.sampler = pipeline, sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


@contextlib.contextmanager
def _page_names(labels: Mapping[str, str] | None = None) -> Iterator[None]:
    """A refused sampling argument (or condition: the request's validation runs the
    conditioner's own checks, e.g. an inpainting mask of another size than its image) as a
    :class:`DemoInputError`, named as the page names it (``labels``: names beyond
    :data:`PAGE_NAMES`)."""
    try:
        yield
    except LdmkitError as err:  # SampleArgumentError, MaskError, ConditionValueError, ...
        raise DemoInputError(message(err, {**PAGE_NAMES, **(labels or {})})) from None


def _required(value: Any, name: str, what: str = "a whole number") -> Any:
    """A field the page needs (empty is not "the default" there)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DemoInputError(f"{name} is empty: give {what}")
    return value


def max_side(pipeline: Any) -> int:
    """The largest height or width the page accepts, for the images it makes and for those it
    reads (a start image, a mask, a class map): 4x the training size (or 1024)."""
    return 4 * int(pipeline.image_size) if pipeline.image_size else 1024


def max_upload_bytes(pipeline: Any) -> int:
    """The largest file the page accepts: a :func:`max_side` square image stored without
    compression at 4 channels of 16 bits, plus 1 MiB for what a file holds besides."""
    return 8 * max_side(pipeline) ** 2 + 2**20


def too_large(name: str, limit: int, size: tuple[int, int] | None = None) -> str:
    """The message for an image over ``limit`` pixels a side: ``size`` is its ``(h, w)``, or
    None where PIL refused to open it (over ``Image.MAX_IMAGE_PIXELS``: ``ldmkit demo`` sets
    that to ``limit**2``)."""
    what = f"is {size[0]}x{size[1]} pixels" if size else f"has more than {limit * limit} pixels"
    return f"{name}: the image {what}; the demo takes images up to {limit}x{limit}"


def _check_size(path: Path, name: str, limit: int) -> None:
    """Refuse an image with a side over ``limit`` from its header, before anything is decoded
    (PIL opens lazily); a file PIL cannot read at all is left to the reader's message."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DemoInputError(too_large(name, limit)) from None
    except Exception:  # not an image: the reader says so, naming the file
        return
    if max(width, height) > limit:
        raise DemoInputError(too_large(name, limit, (height, width)))


def _size(pipeline: Any, height: Any, width: Any) -> tuple[Any, Any] | None:
    """``(h, w)`` as given (the request checks them), or None when both are empty or 0 (the
    pipeline's size, or its inputs'); one empty side is the trained size."""
    if _unset(height) and _unset(width):
        return None
    base = int(pipeline.image_size) if pipeline.image_size else None
    sides = []
    for name, value in (("height", height), ("width", width)):
        if _unset(value):
            if base is None:
                raise DemoInputError(f"{name} is empty: give both height and width, or neither")
            value = base
        sides.append(value)
    return sides[0], sides[1]


def _unset(value: Any) -> bool:
    return value is None or value == "" or value == 0


def _class_id(value: Any, spec: ConditionField, name: str | None = None) -> int:
    """The class id ``value`` names (an id, or its shown name); ``name``: the input, in
    messages (default: the key)."""
    name = name or spec.key
    if value is None or value == "":
        raise DemoInputError(f"{name}: choose a class")
    high = (spec.num_classes - 1) if spec.num_classes else SEED_LIMIT
    shown = {label: i for label, i in spec.choices}
    if isinstance(value, str) and value in shown:  # the shown name instead of the id
        return shown[value]
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # True is no class
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not number.is_integer() or not 0 <= number <= high:
        raise DemoInputError(f"{name}: class {value!r} is not one of this model's classes (0 to {high})")
    return int(number)


def _keep(
    path: Path, inputs_dir: Path, stem: str, uploaded: dict[str, str], *, name: str, limit: int
) -> Path:
    """A copy of an uploaded file in ``inputs_dir`` (the upload cache is Gradio's to clean),
    once its image size is checked (:func:`_check_size`, ``name`` the input in messages);
    ``uploaded`` records the copy's path -> the uploaded name, for messages."""
    if not path.is_file():
        raise DemoInputError(f"{name}: the uploaded file is gone ({path.name}); upload it again")
    _check_size(path, name, limit)
    inputs_dir.mkdir(parents=True, exist_ok=True)
    target = inputs_dir / f"{stem}{path.suffix.lower() or '.png'}"
    if path.resolve() != target.resolve():
        shutil.copyfile(path, target)
    uploaded[str(target)] = path.name
    return target


def _page_message(message: str, uploaded: Mapping[str, str]) -> str:
    """A condition reader's message for the page: without the command-line flag it names
    (``--cond KEY=VALUE:``), naming files as the user uploaded them."""
    message = re.sub(r"^--cond(\s+\S+?)?:\s*", "", message).replace("\n", " ")
    for copy, name in uploaded.items():
        message = message.replace(copy, name)
    return message


# -- what a result records -----------------------------------------------------------------


def settings(
    *,
    checkpoint: Path | str,
    sampler: Mapping[str, Any],
    prepared: Prepared,
    images: Any,
    overrides: Sequence[str],
    device: str,
    precision: str,
) -> dict[str, Any]:
    """The settings ``ldmkit sample`` writes for the same request (same keys, same values)."""
    from ldmkit.sample_io.samples import condition_settings

    p, r = prepared, prepared.request
    return {
        "checkpoint": str(checkpoint),
        "sampler": dict(sampler),
        "guidance_scale": r.guidance_scale,
        "seed": r.seed,
        "num_samples": int(images.shape[0]),
        "batch_size": None,
        "size": [int(images.shape[-2]), int(images.shape[-1])],
        "init_image": p.sources.get("--init-image"),
        "strength": r.strength,
        "mask": p.sources.get("--mask"),
        "refine_known": 0,  # the page does not offer it (ldmkit sample --refine-known)
        "conditions": condition_settings(r.batch, p.kinds, p.sources),
        "negative": condition_settings(r.negative, p.kinds, {}) if r.negative else None,
        "overrides": list(overrides),
        "device": str(device),
        "precision": precision,
        "compile": False,
        "tile": None,
        "tile_overlap": None,
    }


def command_line(
    *,
    checkpoint: Path | str,
    overrides: Sequence[str],
    prepared: Prepared,
    device: str,
    out: str = "samples.png",
) -> str:
    """The ``ldmkit sample`` command that reproduces a result (on the same kind of machine:
    the precision ``auto`` picks, and so the last bits, depend on the hardware), run where
    the result's inputs were downloaded to: it names them as the downloads do."""
    p, r = prepared, prepared.request
    words = ["ldmkit", "sample", "--checkpoint", str(checkpoint), *overrides]
    for item in p.items:
        words += ["--cond", item]
    prompt_key = next((k for k, kind in p.kinds.items() if kind == "text"), None)
    for item in p.negative_items:  # --negative-prompt goes to the first text key, as --prompt
        key, _, value = item.partition("=")
        if key != prompt_key:
            words += ["--negative-cond", item]
        else:  # "--negative-prompt -x" would read -x as an option
            words += [f"--negative-prompt={value}"] if value.startswith("-") else ["--negative-prompt", value]
    words += ["--num-samples", str(p.num_images), "--guidance-scale", repr(r.guidance_scale)]
    words += ["--seed", str(r.seed)]
    if p.size is not None:
        words += ["--height", str(p.size[0]), "--width", str(p.size[1])]
    if "--init-image" in p.sources:
        words += ["--init-image", p.sources["--init-image"], "--strength", repr(r.strength)]
    if "--mask" in p.sources:
        words += ["--mask", p.sources["--mask"]]
    words += ["--device", str(device), "--out", out]
    return shlex.join(words)


def _shown(spec: ConditionField, values: Any, index: int) -> str:
    """Image ``index``'s class name or prompt among ``values`` (one value: every image's)."""
    item = values[index if len(values) > 1 else 0]
    item = item.item() if hasattr(item, "item") else item
    if spec.kind == "class":
        return dict((i, name) for name, i in spec.choices).get(item, f"{spec.key} {item}")
    return str(item)[:60]


def caption(prepared: Prepared, fields: Sequence[ConditionField], index: int) -> str:
    """A gallery caption: the image's seed, its class or prompt, and what it was steered away
    from (``not <class>``, ``not "<prompt>"``) where the request has a negative."""
    parts = [f"seed {prepared.request.seed + index}"]
    negatives = prepared.request.negative or {}
    for spec in fields:
        value = prepared.request.batch.get(spec.key)
        if value is None or spec.kind not in ("class", "text"):
            continue
        parts.append(_shown(spec, value, index))
        negative = negatives.get(spec.key)
        if negative is not None and len(negative):
            away = _shown(spec, negative, index)
            parts.append(f"not {away}" if spec.kind == "class" else f'not "{away}"')
    return " · ".join(parts)
