"""``ldmkit lora``: a LoRA run's adapter folder (``<run_dir>/pipeline/``, :mod:`ldmkit.lora`)
baked into a plain pipeline folder (``merge``), or written as the LoRA file diffusers loads
(``export-diffusers``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ldmkit.cli.common import CLIError, _Parser
from ldmkit.errors import LdmkitError


def lora(argv: Sequence[str], *, prog: str, description: str) -> int:
    """``ldmkit lora merge ADAPTER_DIR --out DIR`` / ``ldmkit lora export-diffusers ADAPTER_DIR --out DIR``."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="merge ADAPTER_DIR --out DIR    export-diffusers ADAPTER_DIR --out DIR\n"
                       "ADAPTER_DIR: the pipeline/ folder of a run trained with trainer.lora.rank > 0 (docs/training.md)")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    merge = sub.add_parser("merge", help="bake the adapter into its base: a plain pipeline folder")
    export = sub.add_parser("export-diffusers", help="the adapter as diffusers' pytorch_lora_weights.safetensors")
    for parser in (merge, export):
        parser.add_argument("adapter", type=Path, help="an adapter folder (adapter.json, adapter.safetensors)")
        parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    args = p.parse_args(argv)
    from ldmkit import frozen
    from ldmkit import lora as adapters
    from ldmkit.io import check_folder
    from ldmkit.pipeline import Pipeline

    try:
        check_folder(args.out, "--out")  # before anything is read
        adapter = adapters.read_adapter(args.adapter) if Path(args.adapter).is_dir() else None
        if adapter is None:
            raise CLIError(_not_an_adapter(Path(args.adapter), adapters.ADAPTER_CONFIG))
        if args.action == "export-diffusers":
            from ldmkit.interop.diffusers.lora import adapter_to_diffusers

            path = adapter_to_diffusers(args.adapter, args.out)
            print(f"wrote {path} (onto the base's diffusers UNet: unet.load_lora_adapter(DIR, prefix='unet', "
                  f"weight_name='{path.name}')); the base is {adapter.base}: ldmkit convert to-diffusers "
                  f"{adapter.base} --out DIR")  # fmt: skip
            return 0
        for folder, what in ((adapter.base, "base pipeline"), (args.adapter, "own folder")):
            if args.out.resolve() == Path(folder).resolve():  # the merge needs both, as they are
                raise CLIError(f"--out {args.out} is the adapter's {what}: write the merged pipeline to a new folder")
        pipeline = Pipeline.load(args.adapter)
        merged = adapters.merge(pipeline)
        # a frozen part kept by reference (frozen.json) would point at the unmerged source
        touched = [n for n in merged if frozen.under(n, frozen.frozen_parts(pipeline))]
        pipeline.save(args.out, embed_frozen=bool(touched))
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err
    print(f"wrote {args.out} ({len(merged)} LoRA layers merged; sample with: ldmkit sample --checkpoint {args.out})")
    return 0


def _not_an_adapter(path: Path, config: str) -> str:
    """Why ``path`` is not an adapter folder, and where the adapter is where that is clear."""
    if not path.exists():
        return f"{path} does not exist (give the adapter folder a LoRA run exports: RUN/pipeline)"
    if path.is_file():
        where = f": give its folder, {path.parent}" if path.name == config else ""
        return f"{path} is a file, not a LoRA adapter folder{where}"
    if (path / "pipeline" / config).is_file():
        return f"{path} is a training run: its adapter is {path / 'pipeline'}"
    return f"{path} is not a LoRA adapter folder (no {config})"
