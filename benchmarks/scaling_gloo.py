"""Scaling on this CPU with gloo: the same stage-2 training (tiny UNet, real prepared shards)
on 1 process and on 2 processes (two torchrun agents meeting at a c10d rendezvous on
127.0.0.1, as two machines would: docs/distributed.md), with the same global batch.

    .venv/bin/python benchmarks/scaling_gloo.py                 # --steps 40 --global-batch 16
    .venv/bin/python benchmarks/scaling_gloo.py --quick         # a seconds-long check, nothing written
    .venv/bin/python benchmarks/scaling_gloo.py --set-2proc trainer.strategy=fsdp   # 2 processes with FSDP

Three runs: 1 process x 1 thread, 1 process x 2 threads (what 2 cores give one process), 2
processes x 1 thread. Steps/s is over the time spent in training steps (the trainer's
``train_seconds``: no start-up, checkpoints or export), of rank 0. The equality check: the
2-process weights against the 1-process x 1-thread weights, relative to how far training moved
them (L2; ``tests/training/multinode.py`` says what lines up and why the difference is float
rounding amplified by AdamW, not 0). The worker is the one tests/training/test_multinode.py
runs. Prints a table and writes ``benchmarks/results/scaling_gloo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from ldmkit.data import prepare  # noqa: E402
from tests.data.conftest import make_image_folder  # noqa: E402
from tests.training.multinode import compare, single_process, two_nodes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scaling_gloo.json"


def run(kind: str, work: Path, shards: Path, args: list[str], timeout: float, two: list[str] = ()) -> dict:
    out = work / kind
    out.mkdir()
    started = time.perf_counter()
    common = [str(shards), str(work / f"run_{kind}"), str(out), *args, *(two if kind == "2proc" else [])]
    if kind == "2proc":
        done = two_nodes(common, timeout=timeout)
    else:
        done = [single_process([*common, f"--threads={2 if kind == '1proc_2threads' else 1}"], timeout=timeout)]
    wall = time.perf_counter() - started
    for process in done:
        if process.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{(process.stdout + process.stderr)[-4000:]}")
    world = 2 if kind == "2proc" else 1
    result = json.loads((out / f"world{world}_rank0.json").read_text())
    return {"run": kind, "processes": world, "steps": result["step"], "train_seconds": result["train_seconds"],
            "steps_per_s": result["step"] / result["train_seconds"], "wall_seconds": wall,
            "weights": str(out / f"world{world}_rank0.pt")}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], help="a config override for every run")
    parser.add_argument("--set-2proc", action="append", default=[],
                        help="an override of the 2-process run only (trainer.strategy=fsdp: the 1-process "
                             "runs stay plain, the reference)")
    parser.add_argument("--quick", action="store_true", help="3 steps at 8x8, batch 4; writes nothing")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.global_batch, args.image_size = 3, 4, 8
    worker_args = [f"--global-batch={args.global_batch}", f"--steps={args.steps}", f"--image-size={args.image_size}",
                   *(f"--set={s}" for s in args.set)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ldmkit-scaling-") as tmp:
        work = Path(tmp)
        # enough samples for every step in one epoch, 3 classes, shards of one global batch
        per_class = -(-args.steps * args.global_batch // 3)
        make_image_folder(work / "images", per_class=per_class, size=(args.image_size, args.image_size))
        prepare("image_folder", work / "shards", path=str(work / "images"), shard_size=args.global_batch,
                progress=False)  # fmt: skip
        two = [f"--set={s}" for s in args.set_2proc]
        rows = [run(kind, work, work / "shards", worker_args, args.timeout, two)
                for kind in ("1proc", "1proc_2threads", "2proc")]  # fmt: skip
        check = compare(Path(rows[2]["weights"]), Path(rows[0]["weights"]))
        for row in rows:
            del row["weights"]
    base = rows[0]["steps_per_s"]
    print(f"{'run':<16}{'steps':>7}{'steps/s':>10}{'speed-up':>10}{'wall s':>9}")
    for row in rows:
        print(f"{row['run']:<16}{row['steps']:>7}{row['steps_per_s']:>10.2f}{row['steps_per_s'] / base:>10.2f}"
              f"{row['wall_seconds']:>9.1f}")  # fmt: skip
    verdict = "equal" if check["same_start"] and check["relative_difference"] < 1e-3 else "DIFFERENT"
    print(f"2 processes vs 1: {verdict} (relative L2 difference {check['relative_difference']:.2e} "
          f"of a {check['moved']:.3g} update)")  # fmt: skip
    if args.quick:
        return
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "steps": args.steps, "global_batch": args.global_batch, "image_size": args.image_size,
            "overrides": args.set, "overrides_2proc": args.set_2proc, "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows, "equality": check}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
