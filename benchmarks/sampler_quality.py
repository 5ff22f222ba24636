"""Quality vs steps of the samplers on the class-conditional Fashion-MNIST LDM (issue 9).

For each sampler and step count: class accuracy of the samples (the project's Fashion-MNIST
classifier, trained on real images only, judges whether a sample shows the class it was
generated for) and the Fréchet distance of the samples to 1,000 real test images in that
classifier's 128-d features. Every configuration samples the same labels with the same
per-sample seeds; DDPM at 1,000 steps runs on a subset (``--ddpm-per-class``) and is compared
with DDIM-50 on the same subset.

    python -m ldmkit.evaluation.classifier --epochs 2 --threads 1          # once
    ldmkit train experiment=fmnist_ldm_kl_f4 ...                           # the model
    .venv/bin/python benchmarks/sampler_quality.py --pipeline runs/fmnist_ldm_kl_f4/pipeline

Writes ``benchmarks/results/sampler_quality.json`` and ``docs/images/sampler_quality.png``.
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

SAMPLERS = ["ddim", "plms", "dpmpp_2m", "euler", "lms", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"]
STEPS = [5, 10, 20, 50]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/fmnist_ldm_kl_f4/pipeline"))
    parser.add_argument("--samplers", nargs="+", default=SAMPLERS)
    parser.add_argument("--steps", type=int, nargs="+", default=STEPS)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--ddpm-per-class", type=int, default=10, help="0 skips DDPM-1000")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="sample on this device (cuda: DDPM-1000 in a minute)")
    parser.add_argument("--precision", default="fp32", help="Pipeline.sample precision (fp32: the table's)")
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/sampler_quality.json")
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/images/sampler_quality.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldmkit.evaluation.classifier import fashion_mnist_arrays, load_classifier, to_model_input
    from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    classifier = load_classifier()
    pipe = Pipeline.load(args.pipeline, device=args.device).eval()
    registry = get_registry()

    def evaluate(images: torch.Tensor, labels: torch.Tensor) -> tuple[FeatureStats, float]:
        stats, hits = FeatureStats(128), 0
        with torch.no_grad():
            for chunk, lab in zip(images.split(500), labels.split(500), strict=True):
                features = classifier.features(chunk)
                stats.update(features)
                hits += int((classifier.head(features).argmax(1) == lab).sum())
        return stats, hits / len(labels)

    test_images, _ = fashion_mnist_arrays("test")
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))
    real_stats, _ = evaluate(
        to_model_input(test_images[order[:1000].numpy()]), torch.zeros(1000, dtype=torch.long)
    )

    def run(name: str, steps: int, per_class: int) -> dict[str, Any]:
        pipe.sampler = registry.create("sampler", name, steps=steps)
        labels = torch.arange(10).repeat(per_class)
        images, start = [], time.perf_counter()
        for first in range(0, len(labels), args.batch):
            chunk = labels[first : first + args.batch]
            images.append(
                pipe.sample({"label": chunk}, seed=first, guidance_scale=args.guidance,
                            precision=args.precision).cpu()
            )  # sample i: seed i
        seconds = time.perf_counter() - start
        stats, accuracy = evaluate(torch.cat(images), labels)
        entry = {
            "sampler": name,
            "steps": steps,
            "samples": len(labels),
            "accuracy": accuracy,
            "frechet": frechet_distance_from_stats(stats, real_stats),
            "seconds": seconds,
        }
        print(json.dumps(entry), flush=True)
        return entry

    results: dict[str, Any] = {
        "pipeline": str(args.pipeline),
        "guidance": args.guidance,
        "per_class": args.per_class,
        "runs": [],
    }
    for name in args.samplers:
        for steps in args.steps:
            results["runs"].append(run(name, steps, args.per_class))
    if args.ddpm_per_class:
        results["ddpm_subset"] = [
            run("ddpm", 1000, args.ddpm_per_class),
            run("ddim", 50, args.ddpm_per_class),
        ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)


def plot(results: dict[str, Any], path: Path) -> None:
    """Two line charts (Fréchet distance and class accuracy against steps), stacked in one PNG."""
    from plotting import stacked_line_charts

    names = [n for n in SAMPLERS if any(r["sampler"] == n for r in results["runs"])]
    series = {key: {} for key in ("frechet", "accuracy")}
    for name in names:
        rows = sorted(
            (r for r in results["runs"] if r["sampler"] == name), key=lambda r: r["steps"]
        )
        series["frechet"][name] = [(r["steps"], r["frechet"]) for r in rows]
        series["accuracy"][name] = [(r["steps"], 100 * r["accuracy"]) for r in rows]
    stacked_line_charts(
        path,
        [
            {"series": series["frechet"], "ylabel": "Fréchet distance (lower is better)"},
            {"series": series["accuracy"], "ylabel": "class accuracy, %"},
        ],
        xlabel="sampler steps",
        title=f"class-conditional Fashion-MNIST LDM, guidance {results['guidance']}",
    )


if __name__ == "__main__":
    main()
