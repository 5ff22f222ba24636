"""Does bf16 cost quality? (issue 13, item 2)

The class-conditional Fashion-MNIST LDM (``experiment=fmnist_ldm_kl_f4`` on the demo's KL-f4
first stage) trained with the same step budget three times — float32 with seeds 0 and 1 (the
run-to-run spread) and bf16 autocast with seed 0 — each run through the real CLI
(``ldmkit train ... trainer.precision=...``), then each sampled in float32 and in bf16 (200
samples, 20 per class, per-sample seeds 0..199, DDIM 50 steps, guidance 3) and judged like
``sampler_quality.py``: class accuracy by the Fashion-MNIST classifier and Fréchet distance
in its features to 1,000 real test images. Also reports each run's training seconds per step
(only meaningful on a quiet machine).

    python benchmarks/precision_quality.py --first-stage runs/demo/kl_f4 --steps 1000

bf16 "does not cost quality" when its figures lie within the two float32 runs' spread.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("fp32", 0), ("fp32", 1), ("bf16", 0)]


def train(run_dir: Path, precision: str, seed: int, args: argparse.Namespace) -> float:
    """Train (or resume) one run; returns the median seconds per step from metrics.csv."""
    cmd = [
        str(Path(sys.executable).with_name("ldmkit")), "train", "experiment=fmnist_ldm_kl_f4",
        f"data.path={args.data}", f"first_stage.checkpoint={args.first_stage}", f"run_dir={run_dir}",
        f"seed={seed}", f"trainer.precision={precision}", "trainer.max_minutes=null",
        f"trainer.max_steps={args.steps}", "trainer.sample_every=100000", "trainer.progress=false",
        f"trainer.num_threads={args.threads}",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    minutes = [(int(r["step"]), float(r["train_minutes"])) for r in rows if r.get("train_minutes")]
    if len(minutes) < 2:
        return float("nan")
    (s0, m0), (s1, m1) = minutes[0], minutes[-1]
    return (m1 - m0) * 60 / max(1, s1 - s0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage", default="runs/demo/kl_f4")
    parser.add_argument("--data", default="data/fashion_mnist")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/precision_quality"))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/precision_quality.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ldmkit.evaluation.classifier import fashion_mnist_arrays, load_classifier, to_model_input
    from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats
    from ldmkit.pipeline import Pipeline

    classifier = load_classifier()

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
    real, _ = evaluate(to_model_input(test_images[order[:1000].numpy()]), torch.zeros(1000, dtype=torch.long))

    results: dict[str, Any] = {"steps": args.steps, "first_stage": args.first_stage, "runs": []}
    for precision, seed in RUNS:
        run_dir = args.out / f"{precision}_seed{seed}"
        seconds = train(run_dir, precision, seed, args)
        pipe = Pipeline.load(run_dir / "pipeline").eval()
        pipe.sampler.steps = 50
        labels = torch.arange(10).repeat(args.per_class)
        for sample_precision in ("fp32", "bf16"):
            images = torch.cat([
                pipe.sample({"label": labels[i : i + 100]}, seed=i, guidance_scale=3.0, precision=sample_precision)
                for i in range(0, len(labels), 100)
            ])
            stats, accuracy = evaluate(images, labels)
            entry = {"train_precision": precision, "seed": seed, "sample_precision": sample_precision,
                     "train_s_per_step": seconds, "accuracy": accuracy,
                     "frechet": frechet_distance_from_stats(stats, real)}
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
