"""Data throughput: images/s decoded, transformed and batched, from WebDataset shards vs from an
image folder holding the very same PNG files, in one run.

    .venv/bin/python benchmarks/data_throughput.py --source fashion_mnist --limit 10000

Both paths decode the same PNG bytes with the same ``ImageTransform`` and batch size; they
differ only in how the bytes reach the decoder (sequential tar reads in the shard pipeline vs one
open() per file in a map-style dataset). Each figure is the best of ``--repeats`` full passes,
alternating the two paths, after one warm-up pass: "warm" reads from the page cache, "cold"
first evicts every shard / image file from it. Appends/replaces the "## Data throughput"
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ldmkit.data import build_dataloader, prepare
from ldmkit.data.shards import iter_shard
from ldmkit.data.stats import DataStats
from ldmkit.data.transforms import ImageTransform

SECTION = "## Data throughput"


class FolderDataset(Dataset):
    """The usual torchvision-style baseline: one file per image, class from the folder."""

    def __init__(self, root: Path, transform: ImageTransform) -> None:
        self.paths = sorted(root.rglob("*.png"))
        self.classes = sorted(p.name for p in root.iterdir())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        with Image.open(path) as image:
            image.load()
            tensor, _ = self.transform(image)
        return {"image": tensor, "label": self.classes.index(path.parent.name)}


def export_folder(shard_dir: Path, manifest, folder: Path) -> int:
    """Write each shard sample's PNG bytes, unchanged, to folder/<class>/<key>.png."""
    count = 0
    for shard in manifest.splits["train"].shards:
        for raw in iter_shard(str(shard_dir / shard.name), DataStats()):
            label = int(raw["cls"]) if "cls" in raw else -1
            name = manifest.classes[label] if label >= 0 else "unlabelled"
            target = folder / name.replace("/", "_") / f"{raw['__key__']}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw["png"])
            count += 1
    return count


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (POSIX_FADV_DONTNEED: our own files only, no root),
    so the next pass reads them from storage: the case shards are designed for."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_pass(loader, files: list[Path] | None) -> float:
    """Images per second over one full pass; ``files`` are evicted first (a cold pass)."""
    if files is not None:
        evict(files)
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def compare(shard_loader, folder_loader, shard_files, folder_files, repeats: int, cold: bool):
    """Best rate of each path; passes alternate so load from other processes hits both alike."""
    timed_pass(shard_loader, None)  # warm-up: imports, worker start-up paths
    timed_pass(folder_loader, None)
    shards, folder = [], []
    for _ in range(repeats):
        shards.append(timed_pass(shard_loader, shard_files if cold else None))
        folder.append(timed_pass(folder_loader, folder_files if cold else None))
    return max(shards), max(folder)


def record(results: Path, text: str, section: str = SECTION) -> None:
    """Replace ``section`` of RESULTS.md (or append it); other sections stay as they are."""
    old = results.read_text() if results.is_file() else "# Benchmark results\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text + ("\n" + old[end + 1 :] if end >= 0 else "")
    results.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="fashion_mnist")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, help="keep the shards and folder here")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ldmkit-bench-"))
    rows = []
    try:
        shard_dir, folder = work / "shards", work / "folder"
        manifest = prepare(
            args.source, shard_dir, split="train", limit=args.limit, overwrite=True, progress=False
        )
        if folder.exists():
            shutil.rmtree(folder)
        n = export_folder(shard_dir, manifest, folder)
        cfg = {"source": args.source, "path": str(shard_dir), "image_size": args.image_size,
               "channels": args.channels, "shuffle_buffer": 1000}  # fmt: skip
        transform = ImageTransform(image_size=args.image_size, channels=args.channels)
        folder_dataset = FolderDataset(folder, transform)
        assert len(folder_dataset) == n == manifest.splits["train"].num_samples
        shard_files = sorted(shard_dir.glob("*.tar"))
        for cache in ("warm", "cold"):
            for workers in args.workers:
                shards, files = compare(
                    build_dataloader(
                        cfg, batch_size=args.batch_size, num_workers=workers, resampled=False
                    ),
                    DataLoader(
                        folder_dataset, batch_size=args.batch_size, shuffle=True,
                        num_workers=workers,
                    ),
                    shard_files,
                    folder_dataset.paths,
                    args.repeats,
                    cold=cache == "cold",
                )  # fmt: skip
                rows.append((cache, workers, shards, files))
                print(
                    f"{cache} cache, workers={workers}: shards {shards:8.0f} img/s | "
                    f"folder {files:8.0f} img/s | ratio {shards / files:.2f}x",
                    flush=True,
                )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    command = "python benchmarks/data_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    size = "x".join(map(str, manifest.image_size or []))
    lines = [
        SECTION,
        "",
        f"`{command.strip()}`: {n} {args.source} images ({manifest.image_mode}, {size}) "
        f"decoded, transformed to {args.channels}x{args.image_size}x{args.image_size} and "
        f"batched by {args.batch_size}; best of {args.repeats} alternating passes after a "
        f"warm-up; {len(shard_files)} shards vs {n} PNG files with identical bytes; cold = "
        f"the files evicted from the page cache before each pass.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| page cache | DataLoader workers | shards (img/s) | image folder (img/s) | shards / folder |",
        "|---|---:|---:|---:|---:|",
        *(f"| {c} | {w} | {s:.0f} | {f:.0f} | {s / f:.2f}x |" for c, w, s, f in rows),
        "",
    ]
    if not args.no_record:
        record(args.results, "\n".join(lines))
        print(f"recorded in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
