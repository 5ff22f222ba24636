"""Where the bf16 time goes, and what each lever of issue 30 gives, in one process.

1. **Per-op profile** (``torch.profiler``) of the UNet's guided-batch sampling forward and of a
   train step (forward + backward + fused AdamW) under the resolved ``precision=auto``: the
   top ops by self time with their share — convolutions, matrix products, attention, the
   casts (``aten::copy_``/``_to_copy``: autocast's weight casts, float32 round trips), norms,
   the optimizer.
2. **Levers, interleaved** (same weights, same noise, one thread, median of rounds and the
   median of per-round ratios against the old path):
   - sampling (``Pipeline.sample``, issue 30's case: 8 images of 64 px, KL-f4, UNet 64 ch
     [1, 2, 4], DDIM 50, guidance 3): ``before`` = autocast over the float32 weights with
     GroupNorm's float32 round trip; ``+copy`` = the low-precision weight copy;
     ``+copy+gn`` = and GroupNorm on the bf16 activations; ``+copy+gn+pack`` = and the copy's
     convolution weights packed for oneDNN once (today's default on a CPU); ``fp32``;
   - train step (``unet_train_step.py --size small``): GroupNorm round trip vs native, and
     float32.

    .venv/bin/python benchmarks/bf16_levers.py --json benchmarks/results/bf16_levers.json

Run it alone on a quiet machine; it prints the host's flags and measured peaks first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def profile_table(fn, rows: int = 12, calls: int = 2) -> list[dict[str, Any]]:
    """Time per aten op over ``calls`` calls of ``fn``, timed at dispatch (a
    ``TorchDispatchMode`` around each kernel): unlike ``torch.profiler``, whose instrumentation
    doubled oneDNN's convolution backward on an AMX host, the sum matches the plain call."""
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    spent: dict[str, list[float]] = defaultdict(list)

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            spent[func.overloadpacket.__name__].append(time.perf_counter() - start)
            return out

    fn()
    with Timed():
        for _ in range(calls):
            fn()
    total = sum(sum(v) for v in spent.values())
    ranked = sorted(spent.items(), key=lambda kv: sum(kv[1]), reverse=True)
    return [
        {"op": name, "self_ms": round(sum(v) / calls * 1e3, 2), "share": round(sum(v) / total, 3),
         "calls": len(v) // calls}
        for name, v in ranked[:rows]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from host import host_info, host_line, interleave
    from sampling_diffusers import CASES, build_pair
    from unet_train_step import autocast_train_step, make_batch, make_models

    from ldmkit import precision as _precision
    from ldmkit.nn import GroupNorm32

    host = host_info()
    print(host_line(host), flush=True)
    resolved = _precision.resolve("auto", "cpu")
    low = "bf16" if resolved == "fp32" else resolved  # an fp32 host still shows the bf16 levers
    results: dict[str, Any] = {"host": host, "precision": low}

    # -- sampling ---------------------------------------------------------------------------
    overrides, batch, steps = CASES["ldm_kl_f4_64_c64"]
    pipe, _ = build_pair(overrides)
    labels = torch.arange(batch) % 10
    side = int(pipe.config.image_size) // pipe.first_stage.downsample_factor
    noise = torch.randn(batch, pipe.first_stage.latent_channels, side, side, generator=torch.Generator().manual_seed(0))

    def sample(precision: str, copy: bool, gn: bool, pack: bool = True):
        def run():
            pipe.low_precision_weights = copy
            pipe.pack_cpu_weights = pack
            GroupNorm32.low_precision_on_cpu = gn
            pipe.sample({"label": labels}, noise=noise, steps=steps, guidance_scale=3.0, precision=precision)

        return run

    net = pipe.sampling_denoiser(low)
    z2 = torch.cat([noise, noise])
    t2 = torch.full((2 * batch,), 500)
    cond = pipe.conditioner({"label": labels})
    both = {k: torch.cat([pipe.conditioner.unconditional({"label": labels})[k], v]) for k, v in cond.items()}

    def forward(module, copy_gn: bool):
        def run():
            GroupNorm32.low_precision_on_cpu = copy_gn
            with torch.inference_mode(), _precision.autocast(low, "cpu"):
                module(z2, t2, both)

        return run

    results["profile_sampling_forward_before"] = profile_table(forward(pipe.denoiser, False))
    results["profile_sampling_forward_now"] = profile_table(forward(net, True))
    results["sampling"] = interleave(
        {
            "before": sample(low, False, False, False),
            "+copy": sample(low, True, False, False),
            "+copy+gn": sample(low, True, True, False),
            "+copy+gn+pack": sample(low, True, True, True),
            "fp32": sample("fp32", True, True),
        },
        args.rounds,
        "before",
    )
    print("sampling", json.dumps(results["sampling"]), flush=True)

    # -- train step -------------------------------------------------------------------------
    model, _ = make_models("small")
    model.train()
    x, t, c, target = make_batch("small")
    steps = {p: autocast_train_step(model, lambda m, *a: m(*a), x, t, c, target, p) for p in (low, "fp32")}

    def train(precision: str, gn: bool):
        def run():
            GroupNorm32.low_precision_on_cpu = gn
            steps[precision]()

        return run

    results["profile_train_step_now"] = profile_table(train(low, True), rows=16)
    results["train_step"] = interleave(
        {"before": train(low, False), "+gn": train(low, True), "fp32": train("fp32", True)}, 2 * args.rounds, "before"
    )
    print("train_step", json.dumps(results["train_step"]), flush=True)
    GroupNorm32.low_precision_on_cpu = True
    for key in ("profile_sampling_forward_before", "profile_sampling_forward_now", "profile_train_step_now"):
        print(key)
        for row in results[key]:
            print(f"  {row['op'][:58]:58s} {row['self_ms']:9.2f} ms {row['share']:6.1%} x{row['calls']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
