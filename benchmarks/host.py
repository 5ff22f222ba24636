"""The host a speed figure was measured on: CPU model, the flags that decide bf16 speed
(AVX2, AVX512, AVX512-BF16, AMX), what ``precision=auto`` and ``compile=auto`` make of them,
and the matrix-product peaks measured here in float32 and bf16 (the yardstick of MFU).

Every benchmark of issue 30 prints :func:`host_line` and stores :func:`host_info` in its JSON:
CPUs differ from one machine to the next (one had AVX2 only, one AVX512-BF16, one AMX), and a
ratio means nothing without them.

    .venv/bin/python benchmarks/host.py          # the line and the JSON of this host
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any

import torch

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10, tries: int = 3) -> float:
    """FLOP/s of an n^3 matrix product in ``dtype`` on this thread count (best of ``tries``)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def interleave(variants: dict[str, Any], rounds: int, baseline: str) -> dict[str, Any]:
    """Each variant (a callable) once to warm up, then ``rounds`` rounds of all of them, the order
    reversed every other round; per variant the median CPU seconds of a call and the median,
    min and max of the per-round ratios ``baseline / variant``."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
    out = {}
    for name, values in times.items():
        ratios = [b / v for b, v in zip(times[baseline], values, strict=True)]
        out[name] = {"median_s": round(statistics.median(values), 4),
                     f"speedup_vs_{baseline}": round(statistics.median(ratios), 3),
                     "range": [round(min(ratios), 3), round(max(ratios), 3)]}
    return out


def report(result: dict[str, Any], path: Any = None) -> None:
    """Print ``result`` as one JSON line (without its ``host``, which :func:`host_line` printed)
    and, given a ``path``, write all of it there."""
    print(json.dumps({k: v for k, v in result.items() if k != "host"}), flush=True)
    if path:
        path.write_text(json.dumps(result, indent=1) + "\n")


def host_info(peaks: bool = True) -> dict[str, Any]:
    from ldmkit import compiling
    from ldmkit import precision as _precision

    flags = _precision.cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "bf16_units": _precision.cpu_bf16_units() or "none",
        "host_kind": compiling.host_kind("cpu"),
        "precision_auto": _precision.resolve("auto", "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if peaks:
        info["gemm_gflops_1024"] = {
            name: round(gemm_peak(dtype) / 1e9, 1) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
    return info


def host_line(info: dict[str, Any]) -> str:
    line = f"host: {info['cpu']}; flags {' '.join(info['flags']) or '-'}; bf16 units: {info['bf16_units']}; "
    line += f"torch {info['torch']}, {info['threads']} thread(s)"
    if "gemm_gflops_1024" in info:
        peak = info["gemm_gflops_1024"]
        line += f"; measured 1024^3 matmul peak fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s"
    return line


if __name__ == "__main__":
    facts = host_info()
    print(host_line(facts))
    print(json.dumps(facts, indent=1))
