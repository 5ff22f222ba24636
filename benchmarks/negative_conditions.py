"""Negative conditions on the class-conditional Fashion-MNIST LDM: how often the Fashion-MNIST
classifier (trained on real images only) reads a sample of class A as the class B it was steered
away from, with guidance's null condition against ``negative={"label": [B]}``.

    python benchmarks/negative_conditions.py --pipeline runs/demo/ldm/pipeline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PAIRS = [(0, 6), (6, 0), (4, 2), (2, 4)]  # (class sampled, class steered away from): the confusable ones


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/ldm/pipeline"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "negative_conditions.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldmkit.evaluation.classifier import load_classifier
    from ldmkit.pipeline import Pipeline

    classifier = load_classifier()
    pipe = Pipeline.load(args.pipeline).eval()
    rows = []
    for target, away in PAIRS:
        for negative in (None, {"label": [away]}):
            images = pipe.sample({"label": [target] * args.samples}, negative=negative,
                                 guidance_scale=args.guidance, seed=0, steps=args.steps)
            with torch.no_grad():
                predicted = classifier.head(classifier.features(images)).argmax(1)
            row = {"class": target, "away_from": away, "negative": negative is not None,
                   "correct": float((predicted == target).float().mean()),
                   "read_as_away": float((predicted == away).float().mean())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps({"pipeline": str(args.pipeline), "samples": args.samples, "steps": args.steps,
                                     "guidance": args.guidance, "sampler": type(pipe.sampler).__name__,
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
