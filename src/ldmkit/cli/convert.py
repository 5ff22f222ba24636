"""``ldmkit convert``: the paper's checkpoints (``compvis``), to and from diffusers."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ldmkit.cli.common import CLIError, _Parser
from ldmkit.errors import LdmkitError


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
    from ldmkit.io import check_folder

    try:
        check_folder(args.out, "--out")  # before anything is read
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if args.source in ("to-diffusers", "from-diffusers"):
        return _convert_diffusers(args)
    from ldmkit.interop import compvis
    from ldmkit.pipeline import Pipeline

    try:
        model = compvis.translation(args.config, args.preset, null_class=args.null_class, text_encoder=args.text_encoder)
        if model.kind == "first_stage":
            _refuse_other_folder(args.out, FIRST_STAGE, "weights the first stage's model.safetensors")
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


PIPELINE, FIRST_STAGE = "a pipeline (config.yaml)", "a first stage (first_stage.yaml)"


def _held(out: Path) -> str | None:
    """What ``out`` holds that a conversion could overwrite, by its files (None: nothing)."""
    if (out / "checkpoints").is_dir():
        return "a training run (checkpoints/)"
    if (out / "first_stage.yaml").is_file():
        return FIRST_STAGE
    if (out / "config.yaml").is_file():  # a pipeline's has its weights beside it (the paper's has not)
        return PIPELINE if (out / "model.safetensors").is_file() else (
            "a config.yaml without a model.safetensors (not an ldmkit pipeline's)")  # fmt: skip
    return None


def _refuse_other_folder(out: Path, own: str, replaced: str) -> None:
    """A :class:`CLIError` when ``out`` holds something else than a folder of the kind
    written (``own``), whose ``replaced`` (a run's config, a first stage's or a pipeline's
    weights, the paper's config.yaml) the conversion would overwrite."""
    held = _held(out)
    if held not in (None, own):
        raise CLIError(f"--out {out} holds {held}, whose {replaced} would replace; write it to another folder")


def _build_and_save(desc: str, reading: str, out: Path, build):
    """``build()`` a pipeline, then save it to ``out``: a conversion's two phases under one bar."""
    _refuse_other_folder(out, PIPELINE, "files the pipeline's config.yaml and model.safetensors")
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
            held = _held(args.out)
            if held is not None:  # a run, or the pipeline itself: its files would mix with diffusers'
                raise CLIError(f"--out {args.out} holds {held}: write the diffusers folder to a folder of its own")
            with _phases(4, "to-diffusers") as bar, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", diffusers_format.ConversionWarning)
                bar.set_postfix_str(f"loading {args.pipeline}")
                pipeline = Pipeline.load(args.pipeline)
                bar.update(1)

                def step(name: str) -> None:
                    bar.set_postfix_str(f"writing {name}")
                    bar.update(1)

                diffusers_format.to_diffusers(pipeline, args.out, progress=step)
            for warning in caught:  # after the bar: what the export wrote nearly, one line each
                if issubclass(warning.category, diffusers_format.ConversionWarning):
                    print(f"ldmkit convert: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            print(f"wrote {args.out} (diffusers: {diffusers_format.describe(args.out)})")
            return 0
        # nothing is written before the build succeeds: the text encoder's config and tokenizer
        # travel with the pipeline as its carried files (files/, Pipeline.save)
        _build_and_save("from-diffusers", f"reading {args.diffusers}", args.out,
                        lambda: Pipeline.from_diffusers(args.diffusers))  # fmt: skip
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err
    print(f"wrote {args.out} (sample with: ldmkit sample --checkpoint {args.out})")
    return 0
