"""Stage-2 figure: a class-conditional LDM on Fashion-MNIST in the latent space of the KL-f4
first stage, trained for a fixed budget of CPU minutes; writes the loss curve PNG and a
class-conditional sample grid (one row per class).

    ldmkit data prepare fashion_mnist out=data/fashion_mnist
    ldmkit train experiment=fmnist_kl_f4                     # the first stage (10 minutes)
    .venv/bin/python benchmarks/ldm_fashion_mnist.py --minutes 20 \\
        --first-stage runs/fmnist_kl_f4

Not a test: the numbers depend on the machine and its load; record the conditions with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from plotting import line_chart  # noqa: E402


def smooth(points: list[tuple[float, float]], window: int = 20) -> list[tuple[float, float]]:
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window + 1) : i + 1]
        out.append((points[i][0], statistics.fmean(y for _, y in chunk)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--first-stage", default="runs/fmnist_kl_f4")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/benchmark_fmnist/fmnist_ldm_kl_f4"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch
    from torchvision.utils import save_image

    from ldmkit.config import compose_config
    from ldmkit.pipeline import Pipeline
    from ldmkit.training import train
    from ldmkit.training.logger import read_metrics

    overrides = ["experiment=fmnist_ldm_kl_f4", f"run_dir={args.run_dir}",
                 f"first_stage.checkpoint={args.first_stage}", f"trainer.max_minutes={args.minutes}",
                 "trainer.progress=false", *args.overrides]
    started = time.perf_counter()
    train(compose_config(overrides))
    wall = time.perf_counter() - started

    rows = read_metrics(args.run_dir)
    train_curve = [(r["train_minutes"], r["train/loss_simple"]) for r in rows if "train/loss_simple" in r]
    val_curve = [(r["train_minutes"], r["val/loss"]) for r in rows if "val/loss" in r]
    chart = line_chart(
        args.out / "ldm_fashion_mnist_loss.png",
        {"train loss (eps MSE, moving average of 20 logs)": smooth(train_curve),
         "validation loss (fixed t and noise)": val_curve},
        xlabel="training minutes", ylabel="loss", title="class-conditional LDM, Fashion-MNIST, KL-f4 latents",
    )
    pipe = Pipeline.load(args.run_dir / "pipeline")
    labels = torch.arange(10).repeat_interleave(8)
    images = pipe.sample({"label": labels}, guidance_scale=3.0, seed=0, steps=50)
    grid = args.out / "ldm_fashion_mnist_samples.png"
    save_image((images + 1) / 2, grid, nrow=8)
    last = rows[-1]
    result = {"overrides": overrides, "wall_minutes": wall / 60,
              "train_minutes": max(m for m, _ in train_curve), "steps": int(last.get("step", 0)),
              "first_train_loss": train_curve[0][1], "last_train_loss_avg20": smooth(train_curve)[-1][1],
              "val_loss": val_curve, "scale_factor": float(pipe.scale_factor),
              "loss_curve": str(chart), "samples": str(grid)}
    (args.out / "ldm_fashion_mnist.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "val_loss"}, indent=2))


if __name__ == "__main__":
    main()
