"""Encode+decode throughput of ldmkit's first stages against diffusers' ``AutoencoderKL`` /
``VQModel`` built with the same architecture and the same weights copied in (one process,
same inputs, interleaved timing). Checks that the outputs agree within 1e-4 first.

    .venv/bin/python benchmarks/autoencoder_diffusers.py --threads 1 --json out.json

Not a test: numbers depend on the machine; record its conditions with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

CONF = Path(__file__).resolve().parents[1] / "plugins/ldmkit-autoencoders/src/ldmkit_autoencoders/conf/first_stage"

# (config option, image size, batch size)
CASES = [
    ("kl_f4_small", 32, 64),
    ("vq_f4_small", 32, 64),
    ("kl_f8", 64, 4),
    ("vq_f4", 64, 4),
]


def build(option: str, channels: int):
    from ldmkit.plugins import get_registry

    config = yaml.safe_load((CONF / f"{option}.yaml").read_text())
    name = config.pop("name")
    config.update(in_channels=channels, out_ch=channels)
    if name == "kl":
        config["encode_mode"] = "mode"  # deterministic, comparable with diffusers' .mode()
    model = get_registry().create("first_stage", name, **config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking weights: perturb the initialization
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return name, model.eval()


def make_pair(option: str, channels: int):
    from ldmkit_autoencoders.diffusers_compat import to_diffusers

    name, ours = build(option, channels)
    theirs = to_diffusers(ours)
    if name == "kl":
        def run_theirs(x):
            return theirs.decode(theirs.encode(x).latent_dist.mode()).sample
    else:
        def run_theirs(x):
            return theirs.decode(theirs.encode(x).latents).sample

    def run_ours(x):
        return ours.decode(ours.encode(x))

    return run_ours, run_theirs


def time_pair(run_ours, run_theirs, x, repeats: int):
    times = {"ldmkit": [], "diffusers": []}
    with torch.inference_mode():
        for fn in (run_ours, run_theirs):  # warm-up
            fn(x)
        for _ in range(repeats):
            for key, fn in (("ldmkit", run_ours), ("diffusers", run_theirs)):
                start = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=None, help="config options to run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    rows = []
    for option, size, batch in CASES:
        if args.cases and option not in args.cases:
            continue
        run_ours, run_theirs = make_pair(option, args.channels)
        x = torch.rand(batch, args.channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.inference_mode():
            max_diff = float((run_ours(x) - run_theirs(x)).abs().max())
        seconds = time_pair(run_ours, run_theirs, x, args.repeats)
        row = {
            "config": option, "image": f"{args.channels}x{size}x{size}", "batch": batch,
            "max_abs_diff": max_diff, "equal_within_1e-4": max_diff <= 1e-4,
            "ldmkit_images_per_s": batch / seconds["ldmkit"],
            "diffusers_images_per_s": batch / seconds["diffusers"],
        }
        row["speedup"] = row["ldmkit_images_per_s"] / row["diffusers_images_per_s"]
        rows.append(row)
        print(f"| {option} | {row['image']} | {batch} | {max_diff:.2e} | "
              f"{row['ldmkit_images_per_s']:.1f} | {row['diffusers_images_per_s']:.1f} | {row['speedup']:.3f} |",
              flush=True)
    meta = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
        "device": "cpu", "processor": platform.processor() or platform.machine(), "repeats": args.repeats,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
