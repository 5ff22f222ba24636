"""The subcommands behind ``ldmkit``."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ldmkit.errors import LdmkitError
from ldmkit.sample_io.samples import condition_settings as _condition_settings
from ldmkit.sample_io.samples import sampler_settings as _sampler_settings
from ldmkit.sample_io.samples import write_samples


class CLIError(RuntimeError):
    """An error the CLI reports in one line (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (``ldmkit sample: error: argument --seed: invalid
    int value: 'abc'``) instead of the usage text first; exit code 2 as argparse's."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description)
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. first_stage=kl_f8 trainer.max_steps=2000"
    )
    p.add_argument(
        "--print-config", action="store_true",
        help="print the composed config (denoiser dims written auto resolved, marked '# auto') and exit",
    )
    return p


def _compose(overrides: Sequence[str], print_config: bool):
    from omegaconf import OmegaConf

    from ldmkit.config import compose_config

    try:
        cfg = compose_config(overrides)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if print_config:
        print(_config_with_resolved_auto(cfg) if "denoiser" in cfg else OmegaConf.to_yaml(cfg))
    return cfg


def _config_with_resolved_auto(cfg) -> str:
    """The config as YAML with the denoiser's ``auto`` dims replaced by the numbers composition
    fills in (what a saved checkpoint records), each marked ``# auto``. The first stage and
    conditioner are built only to read their dims: on the meta device (no memory, no
    weights) where they allow it, for real otherwise."""
    import torch
    from omegaconf import OmegaConf, open_dict

    from ldmkit.assembly import create_component, resolve_denoiser_dims
    from ldmkit.config import AUTO
    from ldmkit.plugins import get_registry

    auto = [key for key, value in cfg.denoiser.items() if value == AUTO]
    if not auto:
        return OmegaConf.to_yaml(cfg)

    def build(kind: str):
        try:
            with torch.device("meta"):
                return create_component(get_registry(), kind, cfg[kind])
        except Exception:  # noqa: BLE001 - some loaders refuse meta tensors: build for real
            return create_component(get_registry(), kind, cfg[kind])

    try:
        first_stage, conditioner = build("first_stage"), build("conditioner")
        conditioner.bind_first_stage(first_stage)
        resolved = resolve_denoiser_dims(cfg, first_stage, conditioner)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    shown = cfg.copy()
    with open_dict(shown):
        for key in auto:
            shown.denoiser[key] = resolved[key]
    lines, block = [], None
    for line in OmegaConf.to_yaml(shown).splitlines():
        block = line.split(":")[0] if line and not line.startswith(" ") else block
        key = line.strip().split(":")[0]
        marked = block == "denoiser" and line.startswith("  ") and not line.startswith("   ") and key in auto
        lines.append(line + "  # auto" if marked else line)
    return "\n".join(lines) + "\n"


def _optional_module(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise CLIError(f"{what} is not available in this ldmkit version ({module} is missing)") from err


def _run_stage(argv: Sequence[str], prog: str, description: str, module: str, function: str):
    """Compose the config from ``argv`` and call ``module.function(cfg)``."""
    args = _parser(prog, description).parse_args(argv)
    cfg = _compose(args.overrides, args.print_config)
    if args.print_config:
        return None
    runner = getattr(_optional_module(module, f"{prog} (stage={cfg.get('stage')})"), function)
    try:
        return runner(cfg)
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err


def train(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Exit codes: 0 done, 1 error, 75 (``EXIT_PREEMPTED``) stopped by SIGTERM/SIGINT after
    checkpointing: run the same command again to continue."""
    import signal
    import warnings

    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        # the trainer's own warnings (resume notes, skipped checkpoints): one line each
        if category.__module__.startswith("ldmkit.training."):
            print(f"{prog}: warning: {message}", file=file or sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    if hasattr(signal, "SIGUSR1"):  # "checkpoint now" before or after training: nothing to save, no reason to die
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run_dir = _run_stage(argv, prog, description, "ldmkit.training", "train")
    except Exception as err:
        signals = sys.modules.get("ldmkit.training.signals")  # loaded if training started
        if signals is None or not isinstance(err, signals.TrainingInterrupted):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        warnings.showwarning = default_show
    if run_dir is not None:
        print(f"run directory: {run_dir}")
    return 0


def evaluate(argv: Sequence[str], *, prog: str, description: str) -> int:
    metrics = _run_stage(argv, prog, description, "ldmkit.evaluation", "evaluate")
    if metrics is not None:
        print(json.dumps(metrics, indent=2, default=str))
    return 0


def data(argv: Sequence[str], *, prog: str, description: str) -> int:
    module = _optional_module("ldmkit.data.cli", "dataset preparation")
    return int(module.main(list(argv)) or 0)


def demo(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Serve ``ldmkit.demo``'s page until Ctrl-C (or SIGTERM); Gradio comes from the
    optional ``demo`` extra."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder written by Pipeline.save")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves "
                        "everyone who can reach it, with no login)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on (default 7860)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait while one samples (default 8); more are turned away")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.queue_size < 1:
        raise CLIError(f"--queue-size must be >= 1, got {args.queue_size}")
    from ldmkit.demo.server import serve
    from ldmkit.devices import resolve_device

    if args.device != "auto":
        try:
            resolve_device(args.device, "--device")  # one that exists here, before Gradio loads
        except LdmkitError as err:
            raise CLIError(str(err)) from None
    try:
        return serve(checkpoint=args.checkpoint, host=args.host, port=args.port,
                     queue_size=args.queue_size, device=args.device)
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise CLIError("the demo needs Gradio, which is not installed: pip install 'ldmkit[demo]'") from None
    except (LdmkitError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {err}") from err


def _null_class(value: str) -> str | int:
    return int(value) if value.lstrip("-").isdigit() else value


def convert(argv: Sequence[str], *, prog: str, description: str) -> int:
    """``ldmkit convert compvis CKPT (--config YAML | --preset NAME) --out DIR``: the paper's checkpoint as an
    ldmkit pipeline folder (or, for a standalone first stage, a first-stage folder);
    ``ldmkit convert to-diffusers PIPELINE_DIR --out DIR`` / ``from-diffusers DIR --out DIR``."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="compvis: CKPT (--config YAML | --preset NAME) --out DIR [--no-ema] [--null-class last|INDEX]\n"
                       "        [--text-encoder CLIP_DIR]  (Stable Diffusion v1)\n"
                       "to-diffusers: PIPELINE_DIR --out DIR    from-diffusers: DIFFUSERS_DIR --out DIR\n"
                       "presets and what is translated: docs/interop.md")
    sub = p.add_subparsers(dest="source", required=True, parser_class=_Parser)
    cv = sub.add_parser("compvis", help="a CompVis/latent-diffusion .ckpt and its config.yaml")
    cv.add_argument("checkpoint", type=Path, help="the .ckpt (or .safetensors) file")
    which = cv.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="the paper's config.yaml of that checkpoint")
    which.add_argument("--preset", help="a published model's stored config (cin256-v2, kl-f8, ...; docs/interop.md)")
    cv.add_argument("--out", type=Path, required=True, help="the folder to write")
    cv.add_argument("--no-ema", dest="use_ema", action="store_false",
                    help="take the raw weights, not the EMA (model_ema.*) ones")
    cv.add_argument("--null-class", default="last", type=_null_class,
                    help="class-conditional models: which class is the unconditional one (last, or an index; default: last)")
    cv.add_argument("--text-encoder", type=Path, default=None,
                    help="Stable Diffusion v1: a local CLIP text model folder (config.json, vocab.json, merges.txt)")
    td = sub.add_parser("to-diffusers", help="an ldmkit pipeline folder as a diffusers folder")
    td.add_argument("pipeline", type=Path, help="a folder written by Pipeline.save / ldmkit train")
    td.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    fd = sub.add_parser("from-diffusers", help="a diffusers folder as an ldmkit pipeline folder")
    fd.add_argument("diffusers", type=Path, help="a diffusers folder (model_index.json, unet/, vae/ or vqvae/, scheduler/)")
    fd.add_argument("--out", type=Path, required=True, help="the ldmkit pipeline folder to write")
    args = p.parse_args(argv)
    if args.source in ("to-diffusers", "from-diffusers"):
        return _convert_diffusers(args)
    from ldmkit.interop import compvis
    from ldmkit.pipeline import Pipeline

    try:
        model = compvis.translation(args.config, args.preset, null_class=args.null_class, text_encoder=args.text_encoder)
        if model.kind == "first_stage":
            state, _ = compvis.convert_state_dict(compvis.load_checkpoint(args.checkpoint), model)
            from omegaconf import OmegaConf
            from safetensors.torch import save_file

            from ldmkit.io import atomic_write, atomic_write_text
            from ldmkit.plugins import get_registry

            node = model.groups["first_stage"]
            module = get_registry().create("first_stage", node["name"], **{k: v for k, v in node.items() if k != "name"})
            compvis.load_converted(module, state, str(args.checkpoint))
            args.out.mkdir(parents=True, exist_ok=True)
            flat = {f"first_stage.{k}": v.contiguous() for k, v in module.state_dict().items()}
            atomic_write(args.out / "model.safetensors", lambda path: save_file(flat, str(path)))
            atomic_write_text(args.out / "first_stage.yaml", OmegaConf.to_yaml(OmegaConf.create(node)))
            print(f"wrote {args.out} (first stage {node['name']}: use first_stage.checkpoint={args.out} "
                  f"with the keys of {args.out / 'first_stage.yaml'})")
            return 0
        pipeline = _build_and_save(
            "convert", f"reading and translating {args.checkpoint.name}", args.out,
            lambda: Pipeline.from_compvis(args.checkpoint, args.config, preset=args.preset, use_ema=args.use_ema,
                                          null_class=args.null_class, text_encoder=args.text_encoder),
        )  # fmt: skip
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err
    weights = "EMA" if pipeline.config.choices.get("weights") == "ema" else "raw"
    print(f"wrote {args.out} ({weights} weights; sample with: ldmkit sample --checkpoint {args.out})")
    return 0


def _phases(total: int, desc: str):
    """A progress bar over a conversion's phases (stderr)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True)


def _build_and_save(desc: str, reading: str, out: Path, build):
    """``build()`` a pipeline, then save it to ``out``: a conversion's two phases under one bar."""
    with _phases(3, desc) as bar:
        bar.set_postfix_str(reading)
        pipeline = build()
        bar.update(2)
        bar.set_postfix_str(f"writing {out}")
        pipeline.save(out)
        bar.update(1)
    return pipeline


def _convert_diffusers(args: argparse.Namespace) -> int:
    from ldmkit.interop import diffusers_format
    from ldmkit.pipeline import Pipeline

    try:
        if args.source == "to-diffusers":
            with _phases(4, "to-diffusers") as bar:
                bar.set_postfix_str(f"loading {args.pipeline}")
                pipeline = Pipeline.load(args.pipeline)
                bar.update(1)

                def step(name: str) -> None:
                    bar.set_postfix_str(f"writing {name}")
                    bar.update(1)

                diffusers_format.to_diffusers(pipeline, args.out, progress=step)
            print(f"wrote {args.out} (diffusers: {diffusers_format.describe(args.out)})")
            return 0
        # the text encoder's config and tokenizer travel with the pipeline
        text = args.out if diffusers_format.copy_text_encoder_files(args.diffusers, args.out) else None
        _build_and_save("from-diffusers", f"reading {args.diffusers}", args.out,
                        lambda: Pipeline.from_diffusers(args.diffusers, text_encoder_dir=text))  # fmt: skip
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err
    print(f"wrote {args.out} (sample with: ldmkit sample --checkpoint {args.out})")
    return 0


SAMPLE_EPILOG = """\
outputs: --out grid.png writes grid.png (all samples), grid/000000.png ... (one PNG per sample,
numbered from 0) and grid.json (the resolved settings: checkpoint, sampler and its options,
guidance, size, strength, init image, mask, conditions, and each image's file and seed).

sampler options are overrides: sampler.steps=20 sampler.spacing=paper; sampler=NAME switches
the sampler (with --checkpoint, sampler.KEY=VALUE alone changes the checkpoint's own sampler).
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
                   help="images to sample (unconditional: default 16, or 1 with --init-image; with one "
                        "condition: repeats it)")
    p.add_argument("--cond", action="append", default=[], metavar="KEY=VALUE",
                   help="a condition input the conditioner reads, e.g. label=3,5 | caption='a red apple' | "
                        "segmentation=map.png | lowres=small.png | image=photo.png | mask=mask.png; repeatable")
    p.add_argument("--labels", type=str, help="shorthand for --cond label=LABELS")
    p.add_argument("--prompt", action="append", help="shorthand for --cond caption=PROMPT; repeatable")
    p.add_argument("--guidance-scale", type=float, default=1.0)
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
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
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
    if not args.out.suffix:
        raise CLIError(f"--out names the grid image, e.g. {args.out}.png; got {args.out}")
    overrides = _checkpoint_sampler_overrides(args.checkpoint, args.overrides)
    cfg = _compose(overrides, args.print_config)
    if args.print_config:
        return 0
    from ldmkit.io import check_writable

    # a read-only --out, or a file where its folders go, fails before sampling, not after
    check_writable(args.out)
    check_writable(args.out.parent / args.out.stem / "000000.png")

    import torch
    from tqdm.auto import tqdm

    from ldmkit.devices import resolve_device
    from ldmkit.pipeline import Pipeline, build_pipeline
    from ldmkit.sample_io.conditions import (
        SOURCE_KEY,
        load_image,
        load_mask,
        parse_conditions,
        repeat_to,
    )

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = str(resolve_device(args.device, "--device"))  # one that exists here
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

    items = list(args.cond) + ([f"{key_of('class', 'label')}={args.labels}"] if args.labels else [])
    items += [f"{key_of('text', 'caption')}={p}" for p in args.prompt or []]
    channels = pipeline.first_stage.image_channels
    try:
        batch = parse_conditions(items, kinds, image_channels=channels)
        init_image = mask = None
        if args.init_image is not None:
            init_image = load_image(args.init_image, channels=channels, flag="--init-image")
        if args.mask is not None:
            mask = load_mask(args.mask, flag="--mask")
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    sources = {f"--cond {k}": v for k, v in (batch.pop(SOURCE_KEY, None) or {}).items()}
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None:
            sources[flag] = str(path)
    num_samples = args.num_samples
    if conditioner.input_keys:
        if num_samples is not None and all(len(batch.get(k, ())) == 1 for k in conditioner.input_keys):
            batch = repeat_to(batch, conditioner.input_keys, num_samples)
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
            request, batch=batch, num_samples=num_samples, size=_sample_size(args, pipeline.image_size),
            init_image=init_image, mask=mask, callback=progress, precision=resolved, compile=cfg.get("compile", False),
        ))  # fmt: skip
    except (LdmkitError, ValueError) as err:
        where = "; ".join(f"{flag}={path}" for flag, path in sources.items())
        raise CLIError(message(err, SAMPLE_FLAGS) + (f" (inputs: {where})" if where else "")) from err
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
        "overrides": list(args.overrides),
        "device": str(device),
        "precision": resolved,
        "compile": cfg.get("compile", False),
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
    }
    written = write_samples(images, args.out, settings, conditioner=conditioner, batch=batch,
                            kinds=kinds, show_conditions=args.show_conditions)
    print(f"wrote {images.shape[0]} samples to {args.out}, {written['folder']}/ and {written['settings']}")
    return 0


# how ldmkit sample's flags name the sampling arguments (ldmkit.sampling_request.message)
SAMPLE_FLAGS = {
    "num_samples": "--num-samples", "guidance_scale": "--guidance-scale", "seed": "--seed",
    "init_image": "--init-image", "strength": "--strength", "mask": "--mask", "batch_size": "--batch-size",
    "refine_known": "--refine-known", "tile": "--tile", "tile_overlap": "--tile-overlap",
}  # fmt: skip


def _sample_size(args: argparse.Namespace, trained: int | None) -> tuple[int, int] | int | None:
    """The size --height, --width and --image-size ask for; one of --height/--width alone
    keeps the other at --image-size, else the ``trained`` size, else the one given."""
    if args.height is None and args.width is None:
        return args.image_size
    base = args.image_size or trained
    h = args.height if args.height is not None else base or args.width
    w = args.width if args.width is not None else base or args.height
    return h, w


def _check_labels(labels: str | None) -> None:
    if labels is not None and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", labels):
        raise CLIError(f"--labels {labels!r}: expected class ids, comma-separated integers >= 0 (e.g. --labels 0,3,7)")


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


def plugins(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Every installed plugin, loaded or not; then, on stderr, what clashes (exit 1)."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from ldmkit.plugins import get_plugin_manager

    manager = get_plugin_manager()
    try:
        rows = manager.plugin_report()
        problems = manager.problems()
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        note = manager.autoload_note()
        if note and any(row["status"] == "not loaded" for row in rows):
            print(f"{note}: the plugins marked 'not loaded' are installed but were not imported\n")
        print(format_plugin_table(rows))
    for problem in problems:
        print(f"{prog}: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def format_plugin_table(rows: list[dict]) -> str:
    if not rows:
        return "no ldmkit plugins installed"
    header = ("plugin", "distribution", "version", "registers", "config groups")
    table = [header]
    for row in rows:
        registers = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["registers"].items()) or "-"
        groups = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["config_groups"].items()) or "-"
        if row["error"]:
            registers, groups = f"BROKEN: {row['error']}", "-"
        elif row.get("status") == "not loaded":
            registers, groups = "not loaded", "-"
        table.append(
            (row["name"], row["distribution"] or "-", row["version"] or "-", registers, groups)
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = []
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    lines.insert(1, "-" * min(120, len(lines[0])))
    return "\n".join(lines)
