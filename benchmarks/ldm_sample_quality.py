"""Sample quality of a class-conditional Fashion-MNIST LDM, judged by an independent network:
the project's Fashion-MNIST classifier (trained on real images only).

* conditional accuracy: the share of samples the classifier assigns to the class they were
  generated for (the classifier itself scores ~90% on real test images);
* Fréchet distance in the classifier's 128-d features between the samples and as many real
  test images, next to the same distance between two disjoint real test subsets (the floor).

    python -m ldmkit.evaluation.classifier --epochs 2 --threads 1       # once
    .venv/bin/python benchmarks/ldm_sample_quality.py --pipeline runs/fmnist_ldm_kl_f4/pipeline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/benchmark_fmnist/fmnist_ldm_kl_f4/pipeline"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ldm_sample_quality.json"))
    args = parser.parse_args()

    from ldmkit.evaluation.classifier import fashion_mnist_arrays, load_classifier, to_model_input
    from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats
    from ldmkit.pipeline import Pipeline

    classifier = load_classifier()
    pipe = Pipeline.load(args.pipeline).eval()
    n = 10 * args.per_class
    labels = torch.arange(10).repeat_interleave(args.per_class)

    def stats_and_predictions(images: torch.Tensor) -> tuple[FeatureStats, torch.Tensor]:
        stats, predictions = FeatureStats(128), []
        with torch.no_grad():
            for chunk in images.split(500):
                features = classifier.features(chunk)
                stats.update(features)
                predictions.append(classifier.head(features).argmax(1))
        return stats, torch.cat(predictions)

    test_images, test_labels = fashion_mnist_arrays("test")
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))
    real_a = to_model_input(test_images[order[:n].numpy()])
    real_b = to_model_input(test_images[order[n : 2 * n].numpy()])
    stats_a, predicted_a = stats_and_predictions(real_a)
    stats_b, _ = stats_and_predictions(real_b)
    real_accuracy = float((predicted_a == torch.from_numpy(test_labels[order[:n].numpy()]).long()).float().mean())
    result = {"pipeline": str(args.pipeline), "samples_per_guidance": n, "steps": args.steps,
              "real_vs_real_frechet": frechet_distance_from_stats(stats_a, stats_b),
              "classifier_accuracy_on_real": real_accuracy, "guidance": {}}
    for scale in args.guidance:
        started = time.perf_counter()
        # per-sample seeds: sample i is seeded i whatever the batch size
        images = pipe.sample({"label": labels}, guidance_scale=scale, seed=0, steps=args.steps,
                             batch_size=args.batch)
        seconds = time.perf_counter() - started
        stats, predicted = stats_and_predictions(images)
        result["guidance"][str(scale)] = {
            "conditional_accuracy": float((predicted == labels).float().mean()),
            "frechet_vs_real": frechet_distance_from_stats(stats, stats_a),
            "sampling_seconds": seconds,
        }
        print(scale, result["guidance"][str(scale)], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
