"""Tar reader: ldmkit's shard reader (``ldmkit.data.shards.iter_shard``) vs ``tarfile``
streaming and ``webdataset.tarfile_to_samples`` on one 20,000-sample shard.

    .venv/bin/python benchmarks/tar_reader.py            # --samples 20000 --repeats 3

The shard is written by ldmkit's own ``ShardWriter`` in a temporary folder: per sample a
28x28 PNG (the first Fashion-MNIST training images from /usr/share/datasets/fashion-mnist,
random pixels where that is missing) and a ``.cls`` label, 40,000 tar members in all. Each
reader goes from the file path to complete samples (members grouped by key) and touches
every member's bytes; nothing is decoded. ``tarfile`` streaming opens the file with
``tarfile.open(mode="r|")`` and groups the members with the same key rule.

One warm-up pass per reader, then ``--repeats`` rounds alternating the readers; each
figure is the best round. The shard sits in the page cache, so this is parsing cost, not
disk speed. Prints a table and writes ``benchmarks/results/tar_reader.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ldmkit.data.shards import ShardWriter, encode_png, iter_shard, split_member_name
from ldmkit.data.stats import DataStats

RESULTS = Path(__file__).resolve().parent / "results" / "tar_reader.json"


def source_images(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(images N×28×28 uint8, labels N, where they came from)."""
    try:
        from ldmkit.evaluation.classifier import fashion_mnist_arrays

        images, labels = fashion_mnist_arrays("train")
        if len(images) >= count:
            return images[:count], labels[:count], "fashion-mnist train"
    except OSError:
        pass
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, count),
        "random pixels",
    )


def write_shard(folder: Path, count: int) -> tuple[Path, str]:
    images, labels, origin = source_images(count)
    writer = ShardWriter(folder, "train", shard_size=count)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        writer.write(
            f"{index:06d}",
            {"png": encode_png(Image.fromarray(image, mode="L")), "cls": str(int(label)).encode()},
        )
    (info,) = writer.close()
    return folder / info.name, origin


def ldmkit_samples(path: Path) -> Iterator[dict]:
    return iter_shard(str(path), DataStats())


def tarfile_stream_samples(path: Path) -> Iterator[dict]:
    with tarfile.open(path, mode="r|") as archive:
        current = None
        for member in archive:
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            key, ext = parts
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = archive.extractfile(member).read()
        if current is not None:
            yield current


def webdataset_samples(path: Path) -> Iterator[dict]:
    return wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()).iterator()


READERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    "ldmkit iter_shard": ldmkit_samples,
    'tarfile.open(mode="r|")': tarfile_stream_samples,
    "webdataset.tarfile_to_samples": webdataset_samples,
}


def one_pass(reader: Callable[[Path], Iterator[dict]], path: Path) -> tuple[float, int, int]:
    """(seconds, samples, payload bytes) for reading every sample of the shard."""
    started = time.perf_counter()
    samples = payload = 0
    for sample in reader(path):
        samples += 1
        payload += len(sample["png"]) + len(sample["cls"])
    return time.perf_counter() - started, samples, payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ldmkit-tar-bench-") as tmp:
        path, origin = write_shard(Path(tmp), args.samples)
        shard_bytes = path.stat().st_size
        expected = None
        for name, reader in READERS.items():  # warm-up: page cache, imports, and a sanity check
            _, samples, payload = one_pass(reader, path)
            if expected is not None and (samples, payload) != expected:
                raise SystemExit(
                    f"{name} read {samples} samples / {payload} bytes, expected {expected}"
                )
            expected = (samples, payload)
        rounds: dict[str, list[float]] = {name: [] for name in READERS}
        for _ in range(args.repeats):
            for name, reader in READERS.items():
                rounds[name].append(one_pass(reader, path)[0])

    best = {name: min(times) for name, times in rounds.items()}
    baseline = best["ldmkit iter_shard"]
    print(
        f"{args.samples} samples ({origin}, PNG + cls, {shard_bytes / 2**20:.1f} MiB), "
        f"best of {args.repeats}"
    )
    print("| reader | best s | samples/s | time vs ldmkit |\n|---|---|---|---|")
    for name, seconds in best.items():
        print(
            f"| {name} | {seconds:.3f} | {args.samples / seconds:,.0f} | {seconds / baseline:.2f}x |"
        )
    report = {
        "samples": args.samples,
        "members": 2 * args.samples,
        "images": origin,
        "shard_bytes": shard_bytes,
        "repeats": args.repeats,
        "seconds_per_round": rounds,
        "best_seconds": best,
        "samples_per_second": {name: args.samples / s for name, s in best.items()},
        "time_vs_ldmkit": {name: s / baseline for name, s in best.items()},
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "webdataset": wds.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
