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
        if args.action == "export-diffusers":
            from ldmkit.interop.diffusers.lora import adapter_to_diffusers

            path = adapter_to_diffusers(args.adapter, args.out)
            print(f"wrote {path} (onto the base's diffusers UNet: unet.load_lora_adapter(DIR, prefix='unet', weight_name='{path.name}'))")
            return 0
        adapter = adapters.read_adapter(args.adapter)
        if adapter is None:
            raise CLIError(f"{args.adapter} is not a LoRA adapter folder (no {adapters.ADAPTER_CONFIG})")
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

