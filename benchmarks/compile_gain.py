"""What torch.compile gains on this host, and whether it pays back its compile time: the
measurement behind ``compile=auto``'s rules (``ldmkit.compiling.AUTO_RULES``, issue 30).

For each purpose and inductor mode, in a fresh process (inductor caches would hide the
compile time), on the UNet of ``unet_train_step.py --size small`` (24M parameters, 16x16
latents, the resolved ``precision=auto``), one thread:

* ``sample``: the guided-batch forward (16 latents) as ``Pipeline.sample`` runs it — on the
  low-precision weight copy under autocast, inference mode, ``torch._inductor.config.freezing``
  (weights folded into the graph: the CPU inference recipe of inductor);
* ``train``: forward + backward + fused AdamW under autocast, as the LDM trainer runs it.

Each cell starts with an empty inductor cache. Eager and compiled alternate, 7 rounds; reported: compile seconds (the first call), median
ms each, the speed-up, and the break-even count (compile seconds / seconds saved per call).
The rule it suggests compiles where the speed-up is > 1.05 with ``min_work`` = 2x the
break-even of the best mode.

    .venv/bin/python benchmarks/compile_gain.py --json benchmarks/results/compile_gain.json
    .venv/bin/python benchmarks/compile_gain.py --purposes sample --modes default   # one cell

Not a test: minutes of compilation per cell on 2 cores; run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def one_cell(purpose: str, mode: str, rounds: int) -> dict:
    import copy

    from unet_train_step import autocast_train_step, make_batch, make_models

    from ldmkit import precision as _precision

    torch.set_num_threads(1)
    resolved = _precision.resolve("auto", "cpu")
    dtype = _precision.DTYPES[resolved]
    ours, _ = make_models("small")
    x, t, cond, target = make_batch("small")
    options = {} if mode == "default" else {"mode": mode}
    if purpose == "sample":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        x, t = torch.cat([x] * 4), torch.cat([t] * 4)
        cond = {k: torch.cat([v] * 4) for k, v in cond.items()}
        ours.eval()
        eager = _precision.low_precision_copy(ours, dtype) if dtype != torch.float32 else ours
        compiled = copy.deepcopy(eager)
        compiled.compile(**options)
        if dtype == torch.bfloat16:  # eager as sampling runs it: the copy's packed convolutions
            _precision.pack_cpu_convolutions(eager)

        def make(model):
            def call():
                with torch.inference_mode(), _precision.autocast(resolved, "cpu"):
                    model(x, t, cond)

            return call
    else:
        ours.train()
        eager, compiled = ours, copy.deepcopy(ours)
        compiled.compile(**options)

        def make(model):
            return autocast_train_step(model, lambda m, *a: m(*a), x, t, cond, target, resolved)

    calls = {"eager": make(eager), "compiled": make(compiled)}
    start = time.perf_counter()
    calls["compiled"]()
    compile_s = time.perf_counter() - start
    for call in calls.values():
        call()
        call()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(rounds):
        for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    saved = eager_s - compiled_s
    return {
        "purpose": purpose,
        "mode": mode,
        "precision": resolved,
        "compile_s": round(compile_s, 1),
        "eager_ms": round(eager_s * 1e3, 1),
        "compiled_ms": round(compiled_s * 1e3, 1),
        "speedup": round(eager_s / compiled_s, 3),
        "break_even_calls": round(compile_s / saved) if saved > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--purposes", nargs="+", default=["sample", "train"], choices=["sample", "train"])
    parser.add_argument("--modes", nargs="+", default=["default", "max-autotune"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cell-timeout", type=float, default=1200, help="seconds per cell (compile included)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cell", nargs=2, metavar=("PURPOSE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print("RESULT " + json.dumps(one_cell(*args.cell, args.rounds)), flush=True)
        return
    from host import host_info, host_line

    torch.set_num_threads(1)
    host = host_info()
    print(host_line(host), flush=True)
    cells = []
    for purpose in args.purposes:
        for mode in args.modes:
            # a fresh inductor cache per cell: a warm one (FX graphs, autotuning results of an
            # earlier run) would hide most of the compile time
            cache = tempfile.mkdtemp(prefix="ldmkit_compile_gain_")
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            try:
                done = subprocess.run(
                    [sys.executable, __file__, "--cell", purpose, mode, "--rounds", str(args.rounds)],
                    capture_output=True, text=True, check=False, timeout=args.cell_timeout, env=env,
                )
            except subprocess.TimeoutExpired:
                cell = {"purpose": purpose, "mode": mode, "error": f"compile + timing over {args.cell_timeout} s"}
            else:
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                cell = json.loads(lines[-1][7:]) if lines else {
                    "purpose": purpose, "mode": mode, "error": done.stderr.strip().splitlines()[-1:]}
            shutil.rmtree(cache, ignore_errors=True)
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    rules = {}
    for purpose in args.purposes:
        paying = [c for c in cells if c["purpose"] == purpose and c.get("speedup", 0) > 1.05 and c["break_even_calls"]]
        best = min(paying, key=lambda c: c["break_even_calls"], default=None)
        rules[purpose] = (
            {"mode": best["mode"], "min_work": 2 * best["break_even_calls"], "speedup": best["speedup"],
             "compile_s": best["compile_s"]}
            if best else {"mode": None}
        )
    print(f"suggested AUTO_RULES for {host['host_kind']}: {json.dumps(rules)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host, "cells": cells, "suggested": rules}, indent=1) + "\n")


if __name__ == "__main__":
    main()
