"""``ldmkit data prepare``: a source -> WebDataset tar shards + ``manifest.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ldmkit._version import __version__
from ldmkit.config_checks import Boolean, Choice, Either, Integer, Number, Text, problem
from ldmkit.data.errors import DataError
from ldmkit.data.manifest import MANIFEST, Manifest, SplitInfo, read_manifest, write_manifest
from ldmkit.data.shards import CAPTION, IMAGE, LABEL, META, SEGMENTATION, ShardWriter, encode_png
from ldmkit.data.sources import source_class
from ldmkit.data.sources.base import Source, SourceSample, printable

try:
    import fcntl
except ImportError:  # Windows: preparations running at once are not told apart
    fcntl = None

STAGING = ".staging-"  # the folder in out= where a preparation writes before replacing

# what prepare's own options take (ldmkit.config_checks specs; the range of val_fraction,
# [0, 1), is checked with the source's splits)
OPTIONS = {
    "split": Text(),
    "limit": Integer(1, null=True),
    "shard_size": Either(Integer(1), Choice("auto")),
    "seed": Integer(),
    "val_fraction": Number(0),
    "overwrite": Boolean(),
    "progress": Boolean(),
}
MAX_SHARD_SIZE = 5000
MIN_SHARD_SIZE = 64
TARGET_SHARDS = 16  # enough shards that ranks x workers each get some


def auto_shard_size(num_samples: int) -> int:
    return max(MIN_SHARD_SIZE, min(MAX_SHARD_SIZE, math.ceil(num_samples / TARGET_SHARDS)))


def encode_sample(sample: SourceSample, source: Source) -> dict[str, bytes]:
    members = {IMAGE: encode_png(sample.image)}
    if source.has_labels:
        members[LABEL] = str(int(sample.label)).encode()
    if source.has_captions:
        members[CAPTION] = (sample.caption or "").encode("utf-8")
    if source.has_segmentation:
        if sample.segmentation is None or sample.segmentation.mode != "L":
            raise DataError(f"{source.name} produced a sample without an L-mode segmentation")
        if sample.segmentation.size != sample.image.size:
            raise DataError(f"{source.name}: segmentation size differs from the image's")
        members[SEGMENTATION] = encode_png(sample.segmentation)
    meta = {"label": int(sample.label), "caption": sample.caption, **sample.meta}
    members[META] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return members


def plan_splits(
    source: Source, split: str, seed: int, val_fraction: float, limit: int | None
) -> dict[str, list[Any]]:
    """Which items go to which split, in write order."""
    natural = source.splits
    if val_fraction and "val" in natural:
        raise ValueError(f"source {source.name!r} has its own val split; val_fraction must be 0")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    plan: dict[str, list[Any]] = {}
    for name in natural:
        items = list(source.items(name))
        if source.shuffle_items:
            random.Random(f"{seed}/{name}").shuffle(items)
        if val_fraction and name == "train":
            n_val = max(1, round(len(items) * val_fraction))
            if n_val >= len(items):
                raise ValueError(
                    f"val_fraction={val_fraction} leaves no train item: source {source.name!r} "
                    f"has {len(items)}"
                )
            if source.shuffle_items:  # already in a seeded order
                plan["val"], items = items[:n_val], items[n_val:]
            else:  # a source that keeps its own order: drawn by the seed all the same
                held = set(random.Random(f"{seed}/val").sample(range(len(items)), n_val))
                plan["val"] = [item for i, item in enumerate(items) if i in held]
                items = [item for i, item in enumerate(items) if i not in held]
        plan[name] = items
    wanted = list(plan) if split == "all" else [s.strip() for s in split.split(",")]
    if val_fraction and "train" in wanted and "val" not in wanted:
        wanted.insert(0, "val")  # carved out of train: written with it, or its items are lost
    unknown = [s for s in wanted if s not in plan]
    if unknown:
        raise ValueError(
            f"source {source.name!r} has no split {unknown[0]!r}; it has: {', '.join(plan)} "
            f"(or split=all)"
        )
    return {name: plan[name][:limit] if limit is not None else plan[name] for name in wanted}


def _existing_manifest(
    out: Path, source_name: str, splits: list[str], overwrite: bool
) -> tuple[Manifest | None, list[str]]:
    """The manifest already in ``out`` (or None) and the splits of it this run replaces (all
    of them for another source). Nothing is deleted here: the new splits are written first."""
    if not (out / MANIFEST).is_file():
        return None, []
    manifest = read_manifest(out)
    if manifest.source != source_name:
        if not overwrite:
            raise DataError(
                f"{out} already holds a {manifest.source!r} dataset; choose another out= or "
                f"pass overwrite=true to replace it"
            )
        return manifest, list(manifest.splits)
    clash = [s for s in splits if s in manifest.splits]
    if clash and not overwrite:
        raise DataError(
            f"{out} already has split {clash[0]!r} of {source_name}; pass overwrite=true to "
            f"rewrite it"
        )
    return manifest, clash


def _check_kept_classes(manifest: Manifest, kept: list[str], src: Source) -> None:
    """Splits kept from an earlier run share the manifest's class lists with the new ones, so
    those must not change (another num_classes, seed or folder would relabel the kept ones)."""
    for what in ("classes", "segmentation_classes"):
        old, new = list(getattr(manifest, what) or []), list(getattr(src, what))
        if kept and old != new:
            raise DataError(
                f"split {kept[0]!r} of {manifest.source}, kept from an earlier prepare, has other "
                f"{what.replace('_', ' ')} ({', '.join(old) or 'none'}) than these options give "
                f"({', '.join(new) or 'none'}); prepare every split together (split=all "
                f"overwrite=true) or choose another out="
            )


def _listed(manifest: Manifest | None) -> set[str]:
    """The names of the shards ``manifest`` lists (none without one)."""
    if manifest is None:
        return set()
    return {shard.name for info in manifest.splits.values() for shard in info.shards}


def _shard_stem(split: str, in_use: set[str]) -> str:
    """What the new shards of ``split`` are named after: the split (``train-000000.tar``), or,
    while the manifest being replaced lists shards of that name, ``train.1`` (and so on): a
    new shard never takes the name of an old one, so the old dataset stays whole until the new
    manifest replaces it in one rename (:func:`_plain_names` renames them after)."""
    for generation in itertools.count():
        stem = split if generation == 0 else f"{split}.{generation}"
        if not any(_shard_name(re.escape(stem)).fullmatch(name) for name in in_use):
            return stem
    raise AssertionError("unreachable")


def _shard_name(stem: str) -> re.Pattern[str]:
    """The names of the shards with the stem (a regular expression) ``stem``."""
    return re.compile(stem + r"-\d{6}\.tar")


def _clear_orphans(out: Path, listed: set[str], splits: set[str]) -> None:
    """Delete the shards of ``splits`` in ``out`` (any stem, :func:`_shard_stem`) that the
    manifest does not list: what a preparation killed while it replaced them left
    (:func:`_commit`)."""
    names = [_shard_name(re.escape(split) + r"(\.\d+)?") for split in splits]
    for path in out.glob("*.tar"):
        if path.name not in listed and any(name.fullmatch(path.name) for name in names):
            path.unlink()


def _commit(out: Path, staging: Path, written: _Written, new: Manifest, old_names: set[str]) -> Manifest:
    """Move the staged shards into ``out`` (under names no shard of the old manifest has),
    replace the manifest in one rename, and only then delete the old shards it no longer
    lists: killed at any point, ``out`` holds the old dataset or the new one, whole (plus
    unlisted shards, which the next preparation deletes). Returns the manifest written."""
    for info in written.splits.values():
        for shard in info.shards:
            os.replace(staging / shard.name, out / shard.name)
    write_manifest(out, new)
    for name in sorted(old_names - _listed(new)):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return _plain_names(out, new)


def _plain_names(out: Path, manifest: Manifest) -> Manifest:
    """Give shards written as ``train.1-NNNNNN.tar`` (:func:`_shard_stem`) their split's own
    names back once the old shards are gone, the same way round: each hard-linked under its
    plain name, the manifest replaced, then the other name deleted. On a file system without
    hard links they keep the names they have."""
    plain = {}
    for split, info in manifest.splits.items():
        for shard in info.shards:
            if not _shard_name(re.escape(split)).fullmatch(shard.name):
                plain[shard.name] = split + shard.name[shard.name.rindex("-") :]
    try:
        for name, target in plain.items():
            os.link(out / name, out / target)
    except OSError:
        for target in plain.values():
            (out / target).unlink(missing_ok=True)
        return manifest
    for info in manifest.splits.values():
        info.shards = [dataclasses.replace(s, name=plain.get(s.name, s.name)) for s in info.shards]
    write_manifest(out, manifest)
    for name in plain:
        (out / name).unlink()
    return manifest


def prepare(
    source: str,
    out: str | os.PathLike,
    *,
    split: str = "all",
    limit: int | None = None,
    shard_size: int | str = "auto",
    seed: int = 0,
    val_fraction: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
    **source_options: Any,
) -> Manifest:
    """Write ``source`` as WebDataset shards under ``out`` and return the manifest.

    ``split`` picks splits (``all``, ``train``, ``train,test``); ``limit`` caps samples per split;
    ``val_fraction`` carves a ``val`` split out of ``train`` (seeded); ``seed`` fixes the
    shuffled write order (and a seeded source's content). Other options go to the source.
    """
    given = {"split": split, "limit": limit, "shard_size": shard_size, "seed": seed,
             "val_fraction": val_fraction, "overwrite": overwrite, "progress": progress}  # fmt: skip
    problems = [problem(k, v, OPTIONS[k].expected) for k, v in given.items() if not OPTIONS[k].accepts(v)]
    if problems:
        raise DataError("; ".join(problems))
    cls = source_class(source)
    if "seed" in cls.options:
        source_options["seed"] = seed
    src = cls(**source_options)
    plan = plan_splits(src, split, seed, float(val_fraction), None if limit is None else int(limit))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # The new splits go to a staging folder and replace the old ones only once all are whole
    # and described: a rewrite that fails (or is killed) leaves the dataset as it was. The
    # staging folder is locked while this runs, so that a second preparation of out= stops
    staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    with _locking(staging):
        try:
            _clear_strays(out, staging)
            replaced = list(plan)
            if "train" in plan and "val" not in src.splits and "val" not in plan:
                replaced.append("val")  # an earlier val_fraction carved it out of this train
            old, dropped = _existing_manifest(out, source, replaced, overwrite)
            old_names = _listed(old)
            _clear_orphans(out, old_names, set(plan) | set(old.splits if old else ()))
            same_source = old is not None and old.source == source
            manifest = old if same_source else Manifest(source=source, fields=[], splits={})
            kept_splits = set(manifest.splits) - set(dropped) - set(plan)
            _check_kept_classes(manifest, sorted(kept_splits), src)
            written = _write_splits(src, source, plan, staging, shard_size, progress, old_names)
            kept = {name: info for name, info in manifest.splits.items() if name in kept_splits}
            options = {
                "seed": seed, "limit": limit, "shard_size": shard_size,
                "val_fraction": val_fraction,
                **{k: v for k, v in src.config.items() if not isinstance(v, Path)},
            }  # fmt: skip
            new = _describe(source, src, written, manifest if kept else None, kept, options)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return _commit(out, staging, written, new, old_names)


@contextlib.contextmanager
def _locking(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` while the block runs (the kernel drops it
    when this process ends, however it ends, so a killed preparation leaves no lock)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clear_strays(out: Path, staging: Path) -> None:
    """Remove what killed preparations left in ``out``; another preparation's staging folder
    that is still locked (:func:`_locking`) means it is writing ``out`` now: an error."""
    strays = [s for s in out.glob(f"{STAGING}*") if s != staging]
    for stray in strays if fcntl is not None else ():
        try:
            fd = os.open(stray, os.O_RDONLY)
        except OSError:  # gone already
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"another `ldmkit data prepare` is writing {out} now ({stray.name}); wait for "
                f"it to end or choose another out="
            ) from None
        finally:
            os.close(fd)
    for stray in strays:
        shutil.rmtree(stray, ignore_errors=True)
    for stray in out.glob(".*.partial"):
        stray.unlink()


def _describe(
    source: str, src: Source, written: _Written, earlier: Manifest | None, kept: dict[str, SplitInfo],
    options: dict[str, Any],
) -> Manifest:
    """The manifest of the written splits plus those ``kept`` from the ``earlier`` one."""
    fields, modes, sizes = written.fields, written.modes, written.sizes
    if earlier is not None:  # splits written by an earlier run stay; describe them too
        fields &= set(earlier.fields)
        modes.add(earlier.image_mode)
        sizes.add(tuple(earlier.image_size) if earlier.image_size else None)
    size = sizes.pop() if len(sizes) == 1 else None
    notes = src.notes()
    if written.failures:
        notes.append(f"{len(written.failures)} items could not be loaded and were left out")
        notes.extend(written.failures[:20])
    if written.warnings:
        notes.append(f"{len(written.warnings)} items were kept with a warning")
        notes.extend(written.warnings[:20])
    return Manifest(
        source=source,
        fields=sorted(fields),
        splits={**kept, **written.splits},
        classes=src.classes,
        segmentation_classes=src.segmentation_classes,
        image_mode=modes.pop() if len(modes) == 1 else None,
        image_size=list(size) if size else None,
        options=options,
        notes=notes,
        created_by=f"ldmkit {__version__}",
    )


@dataclass
class _Written:
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    fields: set[str] = field(default_factory=set)  # the members every sample has
    modes: set[str | None] = field(default_factory=set)
    sizes: set[tuple[int, int] | None] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)  # items left out, one line each
    warnings: list[str] = field(default_factory=list)  # items kept, with what loading them warned


def _write_splits(
    src: Source, source: str, plan: dict[str, list[Any]], folder: Path, shard_size: int | str,
    progress: bool, in_use: set[str],
) -> _Written:
    """Each planned split as shards in ``folder``, named apart from the shards ``in_use``
    (:func:`_shard_stem`), and what its samples have in common."""
    written = _Written()
    fields: set[str] | None = None
    for split_name, items in plan.items():
        size = auto_shard_size(len(items)) if shard_size == "auto" else int(shard_size)
        count = 0
        with ShardWriter(folder, split_name, size, stem=_shard_stem(split_name, in_use)) as writer:
            for index, item in enumerate(
                tqdm(items, desc=f"{source} {split_name}", unit="img", disable=not progress)
            ):
                try:
                    with warnings.catch_warnings(record=True) as caught:  # PIL's name no file
                        warnings.simplefilter("always")
                        sample = src.load(item)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    written.failures.append(printable(f"{split_name} item {item}: {exc}"))
                    continue
                written.warnings += [printable(f"{split_name} item {item}: {w.message}") for w in caught]
                members = encode_sample(sample, src)
                writer.write(f"{split_name}-{index:07d}", members)
                fields = set(members) if fields is None else fields & set(members)
                written.modes.add(sample.image.mode)
                written.sizes.add(sample.image.size)
                count += 1
        if count == 0:
            raise DataError(
                f"{source} {split_name}: none of {len(items)} items could be loaded"
                + (f"; first error: {written.failures[0]}" if written.failures else "")
            )
        written.splits[split_name] = SplitInfo(num_samples=count, shards=writer.shards)
    written.fields = fields or set()
    return written
