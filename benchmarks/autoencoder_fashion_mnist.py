"""Stage-1 figure: train KL-f4 and VQ-f4 first stages for a fixed wall-clock budget of
training on Fashion-MNIST (padded to 32×32, grayscale), evaluate them on the full test split,
and plot test PSNR against training minutes.

    ldmkit data prepare fashion_mnist out=data/fashion_mnist
    python -m ldmkit.evaluation.classifier          # optional: features for the Fréchet distance
    .venv/bin/python benchmarks/autoencoder_fashion_mnist.py --minutes 10

Targets (issue 4): test PSNR >= 27 dB for KL-f4 (c=3), >= 25 dB for VQ-f4. The runs use the
presets ``experiment=fmnist_kl_f4`` / ``experiment=fmnist_vq_f4``: no LPIPS term (the VGG16
weights are not available offline) and no adversarial term. Not a test: the numbers depend on
the machine and its load; record the conditions with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

TARGETS = {"fmnist_kl_f4": 27.0, "fmnist_vq_f4": 25.0}
LABELS = {"fmnist_kl_f4": "KL-f4 (c=3)", "fmnist_vq_f4": "VQ-f4 (c=3, |Z|=8192)"}
COLORS = {"fmnist_kl_f4": (31, 119, 180), "fmnist_vq_f4": (214, 39, 40)}


def run_one(experiment: str, minutes: float, run_root: Path, extra: list[str]) -> dict:
    from ldmkit.config import compose_config
    from ldmkit.evaluation import evaluate
    from ldmkit.training import train
    from ldmkit.training.logger import read_metrics

    run_dir = run_root / experiment
    overrides = [f"experiment={experiment}", f"run_dir={run_dir}", f"trainer.max_minutes={minutes}",
                 "trainer.progress=false", *extra]
    started = time.perf_counter()
    train(compose_config(overrides))
    wall = time.perf_counter() - started
    report = evaluate(compose_config(overrides))
    rows = read_metrics(run_dir)
    curve = [(r["train_minutes"], r["val/psnr"]) for r in rows if "val/psnr" in r]
    last = [r for r in rows if "train_minutes" in r][-1]
    return {"experiment": experiment, "run_dir": str(run_dir), "overrides": overrides,
            "train_minutes": last["train_minutes"], "steps": report["step"],
            "wall_minutes_incl_validation": wall / 60, "curve": curve, "test": report}


def plot(results: list[dict], path: Path) -> None:
    """A small line chart drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 560, 70, 20, 40, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    xmax = max(max(m for m, _ in r["curve"]) for r in results)
    ymin = min(min(p for _, p in r["curve"]) for r in results)
    ymin, ymax = min(15.0, ymin), max(30.0, max(max(p for _, p in r["curve"]) for r in results) + 1)

    def xy(m, p):
        return (left + (width - left - right) * m / xmax,
                top + (height - top - bottom) * (1 - (p - ymin) / (ymax - ymin)))

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for p in range(int(ymin), int(ymax) + 1):
        if p % 5 == 0:
            x0, y0 = xy(0, p)
            d.line([x0, y0, width - right, y0], fill=(225, 225, 225))
            d.text((left - 30, y0 - 6), f"{p}", fill="black")
    for m in range(0, int(xmax) + 1):
        x0, _ = xy(m, ymin)
        d.line([x0, height - bottom, x0, height - bottom + 5], fill="black")
        d.text((x0 - 4, height - bottom + 8), f"{m}", fill="black")
    d.text((width // 2 - 60, height - 25), "training minutes", fill="black")
    d.text((10, 12), "validation PSNR (dB, 256 test images); dot: full test split", fill="black")
    for i, r in enumerate(results):
        color = COLORS.get(r["experiment"], (0, 0, 0))
        target = TARGETS.get(r["experiment"])
        if target is not None:
            x0, y0 = xy(0, target)
            for x in range(int(x0), width - right, 12):
                d.line([x, y0, min(x + 6, width - right), y0], fill=color)
        d.line([xy(m, p) for m, p in r["curve"]], fill=color, width=2)
        x1, y1 = xy(r["train_minutes"], r["test"]["psnr"])
        d.ellipse([x1 - 4, y1 - 4, x1 + 4, y1 + 4], fill=color)
        d.text((left + 15, top + 12 + 16 * i), f"{LABELS.get(r['experiment'], r['experiment'])}: "
               f"test {r['test']['psnr']:.2f} dB (target {target} dB, dashed)", fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--experiments", nargs="*", default=list(TARGETS))
    parser.add_argument("--run-root", type=Path, default=Path("runs/benchmark_fmnist"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    results = []
    for experiment in args.experiments:
        result = run_one(experiment, args.minutes, args.run_root, args.overrides)
        results.append(result)
        t = result["test"]
        print(f"{experiment}: {result['steps']} steps in {result['train_minutes']:.2f} training min; "
              f"test PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.4f}, LPIPS {t['lpips']}, "
              f"FD {t['frechet_distance']} ({t['frechet_features']})", flush=True)
    meta = {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoencoder_fashion_mnist.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, args.out / "autoencoder_fashion_mnist_psnr.png")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
