"""``ldmkit data``: prepare, inspect and check WebDataset shard folders.

ldmkit data prepare SOURCE [out=DIR] [key=value ...]
ldmkit data info DIR
ldmkit data verify DIR
ldmkit data sources
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.errors import LdmkitError

PREPARE_EPILOG = """\
options (key=value): out=DIR (default data/SOURCE), split=all|train|test|..., limit=N,
shard_size=auto|N, seed=N, val_fraction=F, overwrite=true, progress=false, and the source's
own options (see `ldmkit data sources`), e.g. path=DIR for image_folder,
num_classes=K for semantic_scenes.
"""


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["limit=10", "path=/x"]`` -> ``{"limit": 10, "path": "/x"}`` (YAML scalars)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"expected key=value, got {pair!r}")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        # paths and names stay strings even when they look like numbers or dates
        options[key] = value if key in ("path", "out", "objects", "split") else parsed
    return options


def _prepare(args: argparse.Namespace) -> int:
    from ldmkit.data.prepare import prepare
    from ldmkit.io import check_folder

    if "=" in args.source:
        raise DataError(
            f"{args.source!r} is an option, not a source: name the source first (ldmkit data "
            f"prepare SOURCE key=value ...; `ldmkit data sources` lists them)"
        )
    if Path(args.source).is_dir():  # a folder given where the source goes
        from ldmkit.plugins import get_registry

        if args.source not in get_registry().names("data_source"):
            raise DataError(
                f"{args.source!r} is a folder, not a source: a folder of images is the image_folder source "
                f"(ldmkit data prepare image_folder path={shlex.quote(args.source)} ...)"
            )
    options = parse_options(args.options)
    out = options.pop("out", None) or f"data/{args.source}"
    check_folder(out, f"out={out}")
    manifest = prepare(args.source, out, **options)
    print(f"wrote {out}:")
    print(summary(manifest))
    return 0


def summary(manifest) -> str:
    lines = [f"source: {manifest.source}  ({manifest.created_by})"]
    size = "x".join(map(str, manifest.image_size)) if manifest.image_size else "mixed"
    lines.append(f"images: {manifest.image_mode or 'mixed modes'}, {size}")
    lines.append(f"members per sample: {', '.join(manifest.fields)}")
    for name, split in manifest.splits.items():
        total = sum(s.bytes for s in split.shards)
        lines.append(
            f"split {name}: {split.num_samples} samples in {len(split.shards)} shards "
            f"({total / 1e6:.1f} MB)"
        )
    if manifest.classes:
        shown = ", ".join(manifest.classes[:12]) + (" ..." if len(manifest.classes) > 12 else "")
        lines.append(f"classes ({len(manifest.classes)}): {shown}")
    if manifest.segmentation_classes:
        lines.append(
            f"segmentation classes ({len(manifest.segmentation_classes)}): "
            + ", ".join(manifest.segmentation_classes)
        )
    lines.extend(f"note: {note}" for note in manifest.notes)
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    from ldmkit.data.location import locate

    print(summary(locate(args.location, manifest=args.manifest).read_manifest()))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ldmkit.data.location import locate, verify_shards

    location = locate(args.location, manifest=args.manifest)
    count, problems = verify_shards(location, location.read_manifest(), progress=args.progress)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{count - len(problems)} of {count} shards match the manifest")
    return 1 if problems else 0


def _sources(args: argparse.Namespace) -> int:
    from ldmkit.plugins import get_registry

    registry = get_registry()
    for name in registry.names("data_source"):
        entry = registry.get("data_source", name)
        options = ", ".join(f"{k}={v}" for k, v in entry.factory.options.items()) or "-"
        print(f"{name:16s} {entry.factory.description}\n{'':16s} options: {options}\n"
              f"{'':16s} from: {entry.provider}")
    return 0


def build_parser(prog: str = "ldmkit data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="prepare and inspect datasets")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "prepare",
        help="write a source as WebDataset shards + manifest.json",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a registered source: see `ldmkit data sources`")
    p.add_argument("options", nargs="*", metavar="key=value")
    p.set_defaults(run=_prepare)
    where = ("a prepared folder, that folder's URL, or a shard list (local, URLs or pipe: commands, "
             "with {000000..000015} lists), as data.path takes them")  # fmt: skip
    manifest = "the manifest when it is not manifest.json in the same place (as data.manifest)"
    p = commands.add_parser("info", help="summarize a prepared dataset's manifest")
    p.add_argument("location", help=where)
    p.add_argument("--manifest", help=manifest)
    p.set_defaults(run=_info)
    p = commands.add_parser(
        "verify", help="check every shard's size and sha256 against the manifest (streamed ones as they arrive)"
    )
    p.add_argument("location", help=where)
    p.add_argument("--manifest", help=manifest)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(run=_verify)
    p = commands.add_parser("sources", help="list the sources and their options")
    p.set_defaults(run=_sources)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SourceNotFoundError as exc:
        print(f"ldmkit data: {exc}", file=sys.stderr)
        return 1
    except (DataError, ValueError, TypeError) as exc:
        print(f"ldmkit data {args.command}: {exc}", file=sys.stderr)
        return 2
    except LdmkitError as exc:  # the plugins: a broken one (strict mode), a name registered twice
        print(f"ldmkit data {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
