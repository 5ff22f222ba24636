"""``ldmkit sample``. (Each subcommand has a module: ``train``, ``data``, ``demo``, ``convert``,
``plugins``; what they share is in ``common``.)"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ldmkit.cli.common import CLIError, _compose, _parser
from ldmkit.errors import LdmkitError
from ldmkit.sample_io.samples import condition_settings as _condition_settings
from ldmkit.sample_io.samples import grid_format, write_samples
from ldmkit.sample_io.samples import sampler_settings as _sampler_settings

SAMPLE_EPILOG = """\
outputs: --out grid.png writes grid.png (all samples), grid/000000.png ... (one PNG per sample,
numbered from 0) and grid.json (the resolved settings: checkpoint, sampler and its options,
guidance, size, strength, init image, mask, conditions, and each image's file and seed).

sampler options are overrides: sampler.steps=20 sampler.spacing=paper; sampler=NAME switches
the sampler (with --checkpoint, sampler.KEY=VALUE alone changes the checkpoint's own sampler).
With --checkpoint the model is the checkpoint's: overrides may set sampler, precision, compile
and attention only, and --print-config prints the checkpoint's config as it will sample.
"""


def sample(argv: Sequence[str], *, prog: str, description: str) -> int:
    p = _parser(prog, description)
    p.epilog = SAMPLE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder written by Pipeline.save")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="the PNG grid to write; each sample goes to <out stem>/NNNNNN.png and the settings "
                        "to <out stem>.json beside it")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images to sample (unconditional: default 16, or 1 with --init-image); with "
                        "conditions: images PER condition (--labels 0,1 --num-samples 8: 16 images, 8 of each; "
                        "default 1)")
    p.add_argument("--cond", action="append", default=[], metavar="KEY=VALUE",
                   help="a condition input the conditioner reads, e.g. label=3,5 | caption='a red apple' | "
                        "segmentation=map.png | lowres=small.png | image=photo.png | mask=mask.png; repeatable")
    p.add_argument("--labels", type=str,
                   help="shorthand for --cond label=LABELS: class ids or the pipeline's class names, "
                        "comma-separated (--labels 3,5 | --labels sandal,bag)")
    p.add_argument("--rows", type=int, default=None,
                   help="rows of the grid (default: one per condition with --num-samples and several "
                        "conditions, else a roughly square grid)")
    p.add_argument("--prompt", action="append", dest="cond", type=_Prompt,
                   help="shorthand for --cond caption=PROMPT; repeatable (with --cond caption=..., in the order given)")
    p.add_argument("--negative-prompt", action="append", dest="negative", type=_Prompt, metavar="PROMPT",
                   help="guidance steers away from this prompt instead of the null condition (needs "
                        "--guidance-scale other than 1): shorthand for --negative-cond caption=PROMPT")
    p.add_argument("--negative-cond", action="append", dest="negative", metavar="KEY=VALUE",
                   help="a negative condition input, as --cond takes them (--negative-cond label=5); one value "
                        "for every sample or one per condition; keys it leaves out keep the samples' own")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance: 1 none (default), 0 unconditional, above 1 follows the "
                        "conditions more closely (3 is typical)")
    p.add_argument("--image-size", type=int, default=None,
                   help="output size, square (default: the pipeline's, or the size of spatial condition "
                        "inputs or of --init-image)")
    p.add_argument("--height", type=int, default=None,
                   help="output height, any multiple of the first stage's factor f, larger than trained "
                        "included (one of --height/--width alone keeps the other at --image-size or the "
                        "trained size)")
    p.add_argument("--width", type=int, default=None, help="output width (see --height)")
    p.add_argument("--init-image", type=Path, default=None, metavar="PNG",
                   help="img2img / SDEdit: start from this image, noised to --strength")
    p.add_argument("--strength", type=float, default=None,
                   help="with --init-image, in (0, 1] (default 1): the share of the sampler's steps run "
                        "from the noised image; small values stay close to it")
    p.add_argument("--mask", type=Path, default=None, metavar="PNG",
                   help="inpainting with any model: a PNG of the init image's size; white (> 127) is "
                        "repainted, black is kept")
    p.add_argument("--refine-known", type=int, default=0, metavar="STEPS",
                   help="inpainting (--mask, or an inpainting model's image + mask): after sampling, STEPS Adam "
                        "steps on the latent so that its decode matches the kept pixels (no pixels pasted); "
                        "default 0 (off), 20-50 typical")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses seed + i (its own generator, for all of its noise), so "
                        "--seed 5 --num-samples 1 reproduces sample 5 of --seed 0; 0 to 4294967295 "
                        "(the demo's seeds), default 0")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sample at most this many at once to bound memory (the images do not change)")
    p.add_argument("--tile", type=int, default=None,
                   help="decode (and encode --init-image) in overlapping tiles of N latent pixels: the "
                        "first stage's memory is that of one tile, for sizes far beyond training")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="latent pixels shared by neighbouring tiles, blended (default: tile // 4)")
    p.add_argument("--show-conditions", action="store_true",
                   help="one row per sample: its condition inputs (images, maps, masks, prompts), then the sample")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no precision note on stderr")
    args = p.parse_args(argv)
    # --prompt and --cond share one list, so prompts keep their command-line order
    args.prompt = [c for c in args.cond if isinstance(c, _Prompt)] or None
    conds = [c for c in args.cond if not isinstance(c, _Prompt)]
    if args.negative and args.guidance_scale == 1.0:
        flag = "--negative-prompt" if isinstance(args.negative[0], _Prompt) else "--negative-cond"
        raise CLIError(f"{flag} needs --guidance-scale other than 1: it replaces the null condition of "
                       "classifier-free guidance, which a scale of 1 does not evaluate")
    from dataclasses import replace

    from ldmkit.sampling_request import SampleRequest, message

    try:  # the values on their own, before anything is composed or loaded (the image files are read later)
        request = SampleRequest(
            num_samples=args.num_samples, guidance_scale=args.guidance_scale, seed=args.seed,
            size=_sample_size(args, None), init_image=args.init_image, strength=args.strength, mask=args.mask,
            batch_size=args.batch_size, refine_known=args.refine_known, tile=args.tile, tile_overlap=args.tile_overlap,
        )  # fmt: skip
    except LdmkitError as err:
        raise CLIError(message(err, SAMPLE_FLAGS)) from None
    _check_labels(args.labels)
    if args.rows is not None and (args.rows < 1 or args.show_conditions):
        raise CLIError(f"--rows must be a whole number >= 1, got {args.rows}" if args.rows < 1
                       else "--rows does not apply with --show-conditions (one row per sample)")
    if not args.out.suffix:
        raise CLIError(f"--out names the grid image, e.g. {args.out}.png; got {args.out}")
    try:
        grid_format(args.out)
    except ValueError as err:
        raise CLIError(f"--out {err}") from None
    folder = next((o for o in args.overrides if "=" not in o and Path(o).expanduser().is_dir()), None)
    if folder is not None:
        raise CLIError(f"{folder}: an override is KEY=VALUE (did you mean --checkpoint {folder}?)")
    if args.checkpoint is not None:
        _refuse_model_overrides(args.overrides)
    overrides = _checkpoint_sampler_overrides(args.checkpoint, args.overrides)
    cfg = _compose(overrides, args.print_config and args.checkpoint is None, args.config_dir)
    if args.print_config:
        if args.checkpoint is not None:  # what runs: the checkpoint's config, with the overrides that apply
            print(_checkpoint_config(args.checkpoint, cfg, args.overrides), end="")
        return 0
    from ldmkit.io import check_writable

    # a read-only --out, a file where its folders go or a folder where its files go fails
    # before sampling, not after
    for path in (args.out, args.out.with_suffix(".json"), args.out.parent / args.out.stem / "000000.png"):
        check_writable(path)

    from tqdm.auto import tqdm

    from ldmkit.devices import sampling_device
    from ldmkit.pipeline import Pipeline, build_pipeline
    from ldmkit.sample_io.conditions import (
        SOURCE_KEY,
        class_names_by_key,
        load_image,
        load_mask,
        parse_conditions,
        repeat_each,
    )

    device = sampling_device(args.device)  # one that exists here
    from ldmkit import precision as _precision

    try:
        requested = _precision.check(cfg.get("precision", "auto"), key="precision")
        resolved = _precision.resolve(requested, device)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if not args.no_progress:
        print(f"ldmkit sample: {_precision.reason(requested, resolved, device)}", file=sys.stderr)
    try:
        if args.checkpoint is not None:
            pipeline = Pipeline.load(args.checkpoint, device=device)
            sampler_node = _sampler_node(pipeline.config.sampler, cfg.sampler, args.overrides)
            if sampler_node is not None:
                pipeline.with_sampler(sampler_node)
            if any(_override_root(o) == "attention" for o in args.overrides):
                from ldmkit.nn.attention import set_attention_backend

                set_attention_backend(cfg.attention.backend)  # loading set the checkpoint's
        else:
            pipeline = build_pipeline(cfg).to(device)
            print(
                "ldmkit sample: no --checkpoint given, sampling from untrained weights",
                file=sys.stderr,
            )
    except (LdmkitError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    pipeline.eval()

    conditioner = pipeline.conditioner
    kinds = {key: conditioner.input_kind(key) for key in conditioner.input_keys}

    def key_of(kind: str, default: str) -> str:  # the shorthands go to the first key of their kind
        return next((k for k, v in kinds.items() if v == kind), default)

    items = [f"{key_of('text', 'caption')}={c}" if isinstance(c, _Prompt) else c for c in args.cond]
    items += [f"{key_of('class', 'label')}={args.labels}"] if args.labels else []
    channels = pipeline.first_stage.image_channels
    names = class_names_by_key(pipeline)
    try:
        batch = parse_conditions(items, kinds, image_channels=channels, names=names)
        init_image = mask = None
        if args.init_image is not None:
            init_image = load_image(args.init_image, channels=channels, flag="--init-image")
        if args.mask is not None:
            mask = load_mask(args.mask, flag="--mask")
    except LdmkitError as err:
        text = str(err).replace(f"--cond {key_of('class', 'label')}={args.labels}:", f"--labels {args.labels!r}:")
        for flag, key, given in (("--labels", key_of("class", "label"), args.labels),
                                 ("--prompt", key_of("text", "caption"), args.prompt)):  # fmt: skip
            if given and not any(c.partition("=")[0].strip() == key for c in conds):
                text = text.replace(f"--cond {key}=...:", f"{flag}:")  # a key the conditioner does not read
        raise CLIError(text) from err
    files = batch.pop(SOURCE_KEY, None) or {}  # key -> the file of each condition
    negative, negative_sources = None, {}
    if args.negative:
        negative_items = [f"{key_of('text', 'caption')}={c}" if isinstance(c, _Prompt) else c for c in args.negative]
        text_key = key_of("text", "caption")
        prompts = any(isinstance(c, _Prompt) for c in args.negative)

        def negative_flag(key: str) -> str:
            return "--negative-prompt" if prompts and key == text_key else f"--negative-cond {key}=..."

        try:
            negative = parse_conditions(negative_items, kinds, image_channels=channels, names=names)
        except LdmkitError as err:
            raise CLIError(str(err).replace(f"--cond {text_key}=...:", f"{negative_flag(text_key)}:")
                           .replace("--cond ", "--negative-cond ")) from err
        negative_sources = {f"--cond {k}": ", ".join(v) for k, v in (negative.pop(SOURCE_KEY, None) or {}).items()}
        first = conditioner.input_keys[0] if conditioner.input_keys else None
        count = len(batch[first]) if first in batch else None
        for key, value in negative.items():
            if count is not None and len(value) not in (1, count):
                raise CLIError(f"{negative_flag(key)} gives {len(value)} values for {count} condition(s): give 1 "
                               "(for every sample) or one per condition")
    sources = {f"--cond {k}": ", ".join(v) for k, v in files.items()}
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None:
            sources[flag] = str(path)
    given = {"--labels": args.labels, "--prompt": " | ".join(args.prompt or [])}
    conditions = {flag: value for flag, value in given.items() if value}  # named where the conditioner fails
    num_samples, rows = args.num_samples, args.rows
    if conditioner.input_keys:
        if num_samples is not None and all(k in batch for k in conditioner.input_keys):
            n_conditions = len(batch[conditioner.input_keys[0]])
            batch = repeat_each(batch, conditioner.input_keys, num_samples)
            if negative is not None:  # one value per condition follows the conditions' repeats
                negative = repeat_each(negative, [k for k, v in negative.items() if len(v) == n_conditions > 1], num_samples)
            files = repeat_each(files, list(files), num_samples)
            if rows is None and n_conditions > 1 and num_samples > 1:
                rows = n_conditions  # one row per label (prompt, ...)
        num_samples = None
    elif num_samples is None:
        num_samples = 1 if init_image is not None else 16

    steps = int(getattr(pipeline.sampler, "steps", 0) * (args.strength or 1.0)) or None
    bar = tqdm(total=None, desc="sampling", disable=args.no_progress, file=sys.stderr)

    def progress(info: dict) -> None:
        if bar.total is None and steps:
            bar.total = steps * info.get("num_chunks", 1)
            bar.refresh()
        bar.update(1)

    try:
        images = pipeline.sample(replace(
            request, batch=batch, negative=negative, num_samples=num_samples, size=_sample_size(args, pipeline.image_size),
            init_image=init_image, mask=mask, callback=progress, precision=resolved, compile=cfg.get("compile", False),
        ))  # fmt: skip
    except (LdmkitError, ValueError) as err:
        inputs = dict(sources, **(conditions if _raised_in(err, "_conditions") else {}))
        where = "; ".join(f"{flag}={path}" for flag, path in inputs.items())
        from ldmkit.interfaces.conditioner import MissingConditionError

        text = message(err, SAMPLE_FLAGS)
        if isinstance(err, MissingConditionError):  # the flag that gives what it reads
            flags = {key_of("class", "label"): "--labels", key_of("text", "caption"): "--prompt"}
            missing = [flags.get(k, f"--cond {k}=...") for k in conditioner.input_keys if k not in batch]
            text += f"; give {' and '.join(missing)}" if missing else ""
        raise CLIError(text + (f" (inputs: {where})" if where else "")) from err
    finally:
        bar.close()
    settings = {
        "checkpoint": str(args.checkpoint) if args.checkpoint is not None else None,
        "sampler": _sampler_settings(pipeline),
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "num_samples": int(images.shape[0]),
        "batch_size": args.batch_size,
        "size": [int(images.shape[-2]), int(images.shape[-1])],
        "init_image": str(args.init_image) if args.init_image else None,
        "strength": (1.0 if args.strength is None else args.strength) if args.init_image else None,
        "mask": str(args.mask) if args.mask else None,
        "refine_known": args.refine_known,
        "conditions": _condition_settings(batch, kinds, sources),
        "negative": _condition_settings(negative, kinds, negative_sources) if negative is not None else None,
        "overrides": list(args.overrides),
        "device": str(device),
        "precision": resolved,
        "compile": cfg.get("compile", False),
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
    }
    written = write_samples(images, args.out, settings, conditioner=conditioner, batch=batch,
                            kinds=kinds, show_conditions=args.show_conditions, rows=rows, names=names,
                            files=files, init_image=init_image, mask=mask)
    count = images.shape[0]
    print(f"wrote {count} sample{'s' if count != 1 else ''} to {args.out}, {written['folder']}/ and {written['settings']}")
    return 0


class _Prompt(str):
    """A --prompt value in the --cond list (its key is the conditioner's text key)."""


# how ldmkit sample's flags name the sampling arguments (ldmkit.sampling_request.message)
SAMPLE_FLAGS = {
    "num_samples": "--num-samples", "guidance_scale": "--guidance-scale", "seed": "--seed",
    "init_image": "--init-image", "strength": "--strength", "mask": "--mask", "batch_size": "--batch-size",
    "refine_known": "--refine-known", "tile": "--tile", "tile_overlap": "--tile-overlap",
    "negative": "--negative-prompt/--negative-cond",
}  # fmt: skip


def _sample_size(args: argparse.Namespace, trained: int | None) -> tuple[int, int] | int | None:
    """The size --height, --width and --image-size ask for; one of --height/--width alone
    keeps the other at --image-size, else the ``trained`` size, else the one given."""
    for flag, side in (("--height", args.height), ("--width", args.width), ("--image-size", args.image_size)):
        if side is not None and side < 1:
            raise CLIError(f"{flag} must be a whole number >= 1, got {side}")
    if args.height is None and args.width is None:
        return args.image_size
    base = args.image_size or trained
    h = args.height if args.height is not None else base or args.width
    w = args.width if args.width is not None else base or args.height
    return h, w


def _raised_in(err: BaseException, function: str) -> bool:
    """Whether ``err`` was raised inside a call of ``function`` (e.g. the pipeline's conditioning)."""
    return any(frame.f_code.co_name == function for frame, _ in traceback.walk_tb(err.__traceback__))


def _check_labels(labels: str | None) -> None:
    """Class ids and names, before anything loads (names are checked against the pipeline's)."""
    tokens = [t.strip() for t in (labels or "").split(",")]
    if labels is not None and (not any(tokens) or any(re.fullmatch(r"-\d+", t) for t in tokens)):
        raise CLIError(f"--labels {labels!r}: expected class ids (integers >= 0) or class names, comma-separated "
                       "(e.g. --labels 0,3,7 or --labels sandal,bag)")


# with --checkpoint the model is the checkpoint's: overrides may change only these
CHECKPOINT_OVERRIDES = ("sampler", "precision", "compile", "attention")
_FLAG_FOR = {"image_size": "--image-size (or --height/--width) for the output size", "seed": "--seed"}


def _override_root(override: str) -> str:
    """``sampler`` for ``+sampler.steps=3``, ``image_size`` for ``image_size=32``."""
    return re.split(r"[.=]", override.lstrip("+~"), maxsplit=1)[0]


def _refuse_model_overrides(overrides: Sequence[str]) -> None:
    """With --checkpoint, an override of the model (its parts, size, schedule, an experiment)
    would be composed and then ignored: refuse it, naming the flag that does it if one does."""
    for override in overrides:
        root = _override_root(override)
        if root not in CHECKPOINT_OVERRIDES:
            flag = f"; use {_FLAG_FOR[root]}" if root in _FLAG_FOR else ""
            raise CLIError(
                f"{override}: not applied with --checkpoint (the model and its settings are the "
                f"checkpoint's; overrides may set {', '.join(CHECKPOINT_OVERRIDES)}){flag}"
            )


def _checkpoint_config(checkpoint: Path, cfg, overrides: Sequence[str]) -> str:
    """The config ``ldmkit sample --checkpoint`` samples with, as YAML: the checkpoint's, with
    the sampler the overrides choose and the composed precision, compile and attention."""
    from omegaconf import OmegaConf, open_dict

    from ldmkit.pipeline import CONFIG_FILE, read_pipeline_config

    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise CLIError(f"checkpoint file missing: {path}")  # as Pipeline.load says it
    saved = read_pipeline_config(path)
    node = _sampler_node(saved.sampler, cfg.sampler, overrides)
    with open_dict(saved):
        if node is not None:
            saved.sampler = node
            if "choices" in saved and _sampler_switch(overrides):
                saved.choices.sampler = cfg.choices.sampler
        for key in ("precision", "compile", "attention"):
            saved[key] = cfg[key]
    return OmegaConf.to_yaml(saved)


def _checkpoint_sampler_overrides(checkpoint: Path | None, overrides: Sequence[str]) -> list[str]:
    """With a checkpoint, ``sampler.KEY=VALUE`` alone changes the checkpoint's sampler: compose
    from the checkpoint's sampler option, so Hydra checks the keys against the right config."""
    overrides = list(overrides)
    if checkpoint is None or _sampler_switch(overrides) or not _sampler_keys(overrides):
        return overrides
    from omegaconf import OmegaConf

    from ldmkit.pipeline import CONFIG_FILE, read_pipeline_config

    try:
        saved = read_pipeline_config(Path(checkpoint) / CONFIG_FILE)
    except (OSError, ValueError):
        return overrides  # Pipeline.load reports the missing, broken or refused file
    choice = OmegaConf.select(saved, "choices.sampler", default=None)
    return [f"sampler={choice}", *overrides] if choice else overrides


def _sampler_switch(overrides: Sequence[str]) -> bool:
    return any(re.match(r"^\+{0,2}sampler=", o) for o in overrides)


def _sampler_keys(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """``(prefix, key)`` of each ``[+|++|~]sampler.KEY...`` override."""
    found = []
    for override in overrides:
        m = re.match(r"^([+~]*)sampler\.([\w.]+)", override)
        if m:
            found.append((m[1], m[2]))
    return found


def _sampler_node(saved, composed, overrides: Sequence[str]):
    """The sampler config to build for a loaded checkpoint: the composed one after
    ``sampler=NAME``; the checkpoint's own with the overridden keys after ``sampler.KEY=...``;
    None (keep the checkpoint's sampler) without sampler overrides."""
    from omegaconf import OmegaConf

    if _sampler_switch(overrides):
        return composed
    keys = _sampler_keys(overrides)
    if not keys:
        return None
    node = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    for prefix, key in keys:
        if "~" in prefix:
            parent, _, leaf = key.rpartition(".")
            container = OmegaConf.select(node, parent) if parent else node
            if container is not None and leaf in container:
                del container[leaf]
        else:
            OmegaConf.update(node, key, OmegaConf.select(composed, key), merge=False)
    return node
