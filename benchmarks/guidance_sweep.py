"""Guidance sweep on the class-conditional Fashion-MNIST LDM (issue 14, item 3): the paper's
trade-off of classifier-free guidance — class accuracy up, diversity down as the scale grows.

For each guidance scale the same labels are sampled with the same per-sample seeds (DDIM,
50 steps). Measured in the 128-d features of the project's Fashion-MNIST classifier (trained
on real images only): class accuracy (does a sample show the class it was generated for),
the Fréchet distance and KID of the samples to 1,000 real test images, and diversity — the mean
distance of a class's samples to their class centroid, against the same measure on real test
images of that class (1.0 = as diverse as the real data).

    .venv/bin/python benchmarks/guidance_sweep.py --pipeline runs/demo/ldm/pipeline

Writes ``benchmarks/results/guidance_sweep.json``, ``docs/images/guidance_sweep.png`` (the
three curves) and ``docs/images/guidance_sweep_samples.png`` (one row per scale: the same
seeds for three classes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCALES = [1.0, 1.5, 2.0, 3.0, 5.0, 7.0]


def class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean distance of a class's features to their centroid."""
    spreads = []
    for c in labels.unique():
        f = features[labels == c]
        spreads.append((f - f.mean(0)).norm(dim=1).mean())
    return float(torch.stack(spreads).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/ldm/pipeline"))
    parser.add_argument("--scales", type=float, nargs="+", default=SCALES)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", help="Pipeline.sample precision")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/guidance_sweep.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/guidance_sweep.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchvision.utils import make_grid, save_image

    from ldmkit.evaluation.classifier import fashion_mnist_arrays, load_classifier, to_model_input
    from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats, kernel_distance
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    classifier = load_classifier()
    pipe = Pipeline.load(args.pipeline).eval()
    pipe.sampler = get_registry().create("sampler", "ddim", steps=args.steps)

    def features_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([classifier.features(chunk) for chunk in images.split(500)])

    test_images, test_labels = fashion_mnist_arrays("test")
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:1000]
    real = features_of(to_model_input(test_images[order.numpy()]))
    real_labels = torch.as_tensor(test_labels[order.numpy()]).long()
    real_stats = FeatureStats(128)
    real_stats.update(real)
    real_spread = class_spread(real, real_labels)

    labels = torch.arange(10).repeat(args.per_class)
    results: dict[str, Any] = {
        "pipeline": str(args.pipeline),
        "sampler": f"ddim, {args.steps} steps",
        "precision": args.precision,
        "samples_per_scale": len(labels),
        "real_class_spread": real_spread,
        "runs": [],
    }
    rows = []
    for scale in args.scales:
        images, start = [], time.perf_counter()
        for first in range(0, len(labels), args.batch):
            chunk = labels[first : first + args.batch]
            images.append(
                pipe.sample(
                    {"label": chunk}, seed=first, guidance_scale=scale, precision=args.precision
                ).cpu()
            )
        images = torch.cat(images)
        seconds = time.perf_counter() - start
        feats = features_of(images)
        with torch.no_grad():
            accuracy = float((classifier.head(feats).argmax(1) == labels).float().mean())
        stats = FeatureStats(128)
        stats.update(feats)
        entry = {
            "guidance": scale,
            "accuracy": accuracy,
            "frechet": frechet_distance_from_stats(stats, real_stats),
            "kid": kernel_distance(real, feats, subset_size=len(feats))[0],
            "diversity": class_spread(feats, labels) / real_spread,
            "seconds": seconds,
        }
        results["runs"].append(entry)
        print(json.dumps(entry), flush=True)
        # classes 0 (T-shirt), 5 (sandal), 8 (bag): the first 6 seeds of each
        pick = torch.cat([torch.nonzero(labels == c).flatten()[:6] for c in (0, 5, 8)])
        rows.append((images[pick] + 1) / 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    grid = make_grid(torch.cat(rows), nrow=18, padding=2, pad_value=1.0)
    save_image(grid, args.plot.with_name(args.plot.stem + "_samples.png"))


def plot(results: dict[str, Any], path: Path) -> None:
    """Three line charts against the guidance scale, stacked in one PNG."""
    from plotting import stacked_line_charts

    runs = results["runs"]
    stacked_line_charts(
        path,
        [
            {"series": {"DDIM-50": [(r["guidance"], scale * r[key]) for r in runs]}, "ylabel": label}
            for key, label, scale in (
                ("accuracy", "class accuracy, %", 100),
                ("frechet", "Frechet distance (lower is better)", 1),
                ("diversity", "within-class spread / real data's", 1),
            )
        ],
        xlabel="guidance scale",
        title="classifier-free guidance, class-conditional Fashion-MNIST LDM",
    )


if __name__ == "__main__":
    main()
