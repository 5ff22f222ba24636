"""Streamed vs local shards: samples/s reading the prepared Fashion-MNIST shards from a local
``python -m http.server`` (127.0.0.1) and from disk, with 0 and 2 DataLoader workers, and
ldmkit's tar reader vs webdataset's own reader on the same HTTP streams.

    .venv/bin/python benchmarks/stream_throughput.py                       # data/fashion_mnist
    .venv/bin/python benchmarks/stream_throughput.py --data /work/main/data/fashion_mnist
    .venv/bin/python benchmarks/stream_throughput.py --quick --no-record   # does it work?

Rows (each the best of ``--repeats`` passes over the first ``--shards`` train shards, the
cases alternating so load from elsewhere hits them alike, after one warm-up pass each):

* ``loader``: ``build_dataloader`` — read, decode the PNG, transform to 3x32x32, batch by 64
  — with ``data.path`` the folder (disk, page cache warm) or ``http://127.0.0.1:PORT`` (curl
  through webdataset's ``gopen``, parsed by ldmkit's reader);
* ``webdataset``: the same decode, transform and batching behind webdataset's own reader
  (``wds.WebDataset(urls)``: ``gopen`` + ``tarfile`` streaming, split by worker);
* ``reader only``: complete raw samples, nothing decoded, one process: ldmkit's
  ``iter_shard`` vs webdataset's ``tarfile_to_samples`` on the same URLs.

The faster of the two readers is what streams should use (``shards.iter_shard`` today).
Writes the "## Streamed vs local shards" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ldmkit.data import build_dataloader, read_manifest
from ldmkit.data.decode import SampleDecoder, collate
from ldmkit.data.shards import iter_shard
from ldmkit.data.stats import DataStats
from ldmkit.data.transforms import ImageTransform

sys.path.insert(0, str(Path(__file__).parent))
from data_throughput import record  # noqa: E402  (the RESULTS.md section writer)

SECTION = "### Streamed vs local shards"  # under "## Scale-out (issue 29)"


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on 127.0.0.1 and a free port, serving ``folder``."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://...) ..."
    port = int(line.split(" port ")[1].split()[0])
    return proc, f"http://127.0.0.1:{port}"


def rate(batches: Callable[[], Iterable], count: Callable[[object], int]) -> float:
    start = time.perf_counter()
    samples = sum(count(batch) for batch in batches())
    return samples / (time.perf_counter() - start)


def best(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Best rate of each case: one warm-up pass each, then ``repeats`` alternating rounds."""
    for run in cases.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            rates[name].append(run())
            print(f"  {name}: {rates[name][-1]:,.0f} samples/s", flush=True)
    return {name: max(values) for name, values in rates.items()}


def webdataset_loader(urls: list[str], decoder: SampleDecoder, batch: int, workers: int):
    """webdataset's reader with ldmkit's decode, transform and collate (no shuffling)."""
    dataset = (
        wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )  # fmt: skip
        .map(decoder)
        .batched(batch, collation_fn=collate, partial=True)
    )
    return DataLoader(dataset, batch_size=None, num_workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/fashion_mnist"),
        help="a prepared Fashion-MNIST folder (ldmkit data prepare fashion_mnist)",
    )
    parser.add_argument("--shards", type=int, default=8, help="first N train shards (of 16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 shards, 1 repeat: a smoke run")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.shards, args.repeats = 2, 1

    folder = args.data.resolve()
    manifest = read_manifest(folder, source="fashion_mnist")
    shards = manifest.split("train").shards[: args.shards]
    samples = sum(s.num_samples for s in shards)
    names = "{" + ",".join(s.name for s in shards) + "}" if len(shards) > 1 else shards[0].name
    transform = ImageTransform(image_size=32, channels=3)
    decoder = SampleDecoder.for_manifest(manifest, transform)
    server, url = serve(folder)
    rows = []
    try:
        where = {"disk": str(folder / names), "http": f"{url}/{names}"}
        urls = [f"{url}/{s.name}" for s in shards]

        def count(batch) -> int:
            return len(batch["__key__"])

        def loader(path: str, workers: int):
            cfg = {"source": "fashion_mnist", "path": path, "image_size": 32, "channels": 3}
            return build_dataloader(cfg, batch_size=args.batch_size, num_workers=workers,
                                    resampled=False, shuffle=False)  # fmt: skip

        def pipelines(workers: int) -> dict[str, Callable[[], float]]:
            return {
                f"loader, disk, {workers} workers": lambda: rate(
                    lambda: loader(where["disk"], workers), count
                ),
                f"loader, http, {workers} workers": lambda: rate(
                    lambda: loader(where["http"], workers), count
                ),
                f"webdataset, http, {workers} workers": lambda: rate(
                    lambda: webdataset_loader(urls, decoder, args.batch_size, workers), count
                ),
            }

        for workers in args.workers:
            print(f"workers={workers}", flush=True)
            rows += list(best(pipelines(workers), args.repeats).items())
        print("reader only", flush=True)

        def ldmkit_reader():
            return (raw for u in urls for raw in iter_shard(u, DataStats()))

        def webdataset_reader():
            return wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))

        cases = {
            "reader only, http: ldmkit iter_shard": lambda: rate(ldmkit_reader, lambda _: 1),
            "reader only, http: webdataset tarfile_to_samples": lambda: rate(
                webdataset_reader, lambda _: 1
            ),
        }
        rows += list(best(cases, args.repeats).items())
    finally:
        server.terminate()
        server.wait()

    command = "python benchmarks/stream_throughput.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        SECTION,
        "",
        f"`{command.strip()}`: the first {len(shards)} train shards of `{args.data}` "
        f"({samples} Fashion-MNIST samples, {sum(s.bytes for s in shards) / 2**20:.1f} MiB) read "
        f"from disk (page cache warm) and from `python -m http.server` on 127.0.0.1 (curl "
        f"through webdataset's `gopen`); decoded, transformed to 3x32x32 and batched by "
        f"{args.batch_size}; best of {args.repeats} alternating passes after a warm-up.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, webdataset "
        f"{wds.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "| case | samples/s |",
        "|---|---:|",
        *(f"| {name} | {value:,.0f} |" for name, value in rows),
        "",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(args.results, "\n".join(lines), SECTION)
        print(f"recorded in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
