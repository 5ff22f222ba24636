"""The subcommands behind ``ldmkit``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ldmkit.errors import LdmkitError


class CLIError(RuntimeError):
    """An error the CLI reports in one line (no traceback)."""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. first_stage=kl_f8 trainer.max_steps=2000"
    )
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    return p


def _compose(overrides: Sequence[str], print_config: bool):
    from omegaconf import OmegaConf

    from ldmkit.config import compose_config

    try:
        cfg = compose_config(overrides)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if print_config:
        print(OmegaConf.to_yaml(cfg))
    return cfg


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
    run_dir = _run_stage(argv, prog, description, "ldmkit.training", "train")
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


def sample(argv: Sequence[str], *, prog: str, description: str) -> int:
    p = _parser(prog, description)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder written by Pipeline.save")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG grid to write")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images to sample (unconditional: default 16; with one condition: repeats it)")
    p.add_argument("--cond", action="append", default=[], metavar="KEY=VALUE",
                   help="a condition input the conditioner reads, e.g. label=3,5 | caption='a red apple' | "
                        "segmentation=map.png | lowres=small.png | image=photo.png | mask=mask.png; repeatable")
    p.add_argument("--labels", type=str, help="shorthand for --cond label=LABELS")
    p.add_argument("--prompt", action="append", help="shorthand for --cond caption=PROMPT; repeatable")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=None,
                   help="output size (default: the pipeline's, or the size of spatial condition inputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-conditions", action="store_true",
                   help="one row per sample: its condition inputs (images, maps, masks, prompts), then the sample")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = _compose(args.overrides, args.print_config)
    if args.print_config:
        return 0

    import torch
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    from ldmkit.cli.conditions import parse_conditions, repeat_to
    from ldmkit.config import build_pipeline, create_component
    from ldmkit.pipeline import Pipeline, image_grid_rows
    from ldmkit.plugins import get_registry

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        if args.checkpoint is not None:
            pipeline = Pipeline.load(args.checkpoint, device=device)
            if any(o.lstrip("+").startswith("sampler") for o in args.overrides):
                pipeline.sampler = create_component(get_registry(), "sampler", cfg.sampler)
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
    try:
        batch = parse_conditions(items, kinds, image_channels=pipeline.first_stage.image_channels)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    num_samples = args.num_samples
    if conditioner.input_keys:
        if num_samples is not None and all(len(batch.get(k, ())) == 1 for k in conditioner.input_keys):
            batch = repeat_to(batch, conditioner.input_keys, num_samples)
        num_samples = None
    elif num_samples is None:
        num_samples = 16

    steps = getattr(pipeline.sampler, "steps", None)
    bar = tqdm(total=steps, desc="sampling", disable=args.no_progress, file=sys.stderr)
    try:
        images = pipeline.sample(
            batch,
            num_samples=num_samples,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            image_size=args.image_size,
            callback=lambda info: bar.update(1),
        )
    except (LdmkitError, ValueError) as err:
        sources = batch.get("__source__") or {}
        where = "; ".join(f"--cond {k}={v}" for k, v in sources.items())
        raise CLIError(f"{err}" + (f" (inputs: {where})" if where else "")) from err
    finally:
        bar.close()
    n = images.shape[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.show_conditions:
        from ldmkit.visualize import samples_with_conditions

        tiles, per_row = samples_with_conditions(images, conditioner, batch)
        save_image(tiles, args.out, nrow=per_row or image_grid_rows(n))
    else:
        save_image((images + 1) / 2, args.out, nrow=image_grid_rows(n))
    print(f"wrote {n} samples to {args.out}")
    return 0


def plugins(argv: Sequence[str], *, prog: str, description: str) -> int:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from ldmkit.plugins import get_plugin_manager

    try:
        rows = get_plugin_manager().plugin_report()
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_plugin_table(rows))
    return 0


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
        table.append(
            (row["name"], row["distribution"] or "-", row["version"] or "-", registers, groups)
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = []
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    lines.insert(1, "-" * min(120, len(lines[0])))
    return "\n".join(lines)
