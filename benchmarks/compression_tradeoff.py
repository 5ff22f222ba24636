"""LDM-{1,2,4,8,16} at equal stage-2 compute (issue 14, item 1; the shape of the paper's
Fig. 6/7): class-conditional diffusion on Fashion-MNIST upscaled to 64x64, in pixel space
(f = 1, ``first_stage=identity``) and in the latent space of KL-reg first stages with
f = 2, 4, 8, 16, every denoiser the same UNet (same widths and depth) trained for the same
*training* time (``trainer.max_minutes``, which counts training steps only and sums over
resumes). Each stage-2 run is stopped and scored at 1/3, 2/3 and 3/3 of its budget.

Why Fashion-MNIST: it has class labels, so the project's offline Fashion-MNIST classifier
(trained on real images only) judges class accuracy and supplies the features for the
Fréchet distance and KID; the emoji and tuxpaint sets have no classes and under 2,000
images. Why 64x64: the smallest size at which f = 16 still leaves a 4x4 latent.

Scores per checkpoint, with ``--per-class`` samples per class (DDIM, ``--sample-steps``
steps, guidance ``--guidance``): class accuracy, Fréchet distance and KID against 1,000 real
test images, in the classifier's 128-d features. Sampling throughput (images/s, the whole
``Pipeline.sample``: denoising loop with guidance and the decode) is measured at the end,
one model after another on an otherwise idle machine.

    .venv/bin/python benchmarks/compression_tradeoff.py --minutes 5 --jobs 2

Runs go through the real CLI (``ldmkit train``); ``--jobs 2`` trains two runs at once with
one thread each, so every run sees the same machine. Writes
``benchmarks/results/compression_tradeoff.json``, ``docs/images/compression_tradeoff.png``
(quality against training time) and ``docs/images/compression_tradeoff_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# f -> (first-stage ch_mult, latent channels); f = 1 is pixel space
FACTORS: dict[int, tuple[list[int], int] | None] = {
    1: None,
    2: ([1, 2], 2),
    4: ([1, 2, 4], 3),
    8: ([1, 2, 4, 4], 4),
    16: ([1, 2, 4, 4, 4], 8),
}
# one UNet for every f: three levels, self- and cross-attention at the lowest
UNET = [
    "denoiser.model_channels=64",
    "denoiser.channel_mult=[1,2,2]",
    "denoiser.num_res_blocks=1",
    "denoiser.attention_resolutions=[4]",
    "denoiser.num_head_channels=32",
]


def ldmkit(*args: str) -> None:
    exe = Path(sys.executable).with_name("ldmkit")
    subprocess.run([str(exe), *args], check=True, stdout=subprocess.DEVNULL)


def first_stage_overrides(f: int, ae_run: Path) -> list[str]:
    if FACTORS[f] is None:
        return [
            "first_stage=identity",
            "first_stage.channels=1",
            "first_stage.latent_channels=1",
            "~first_stage.in_channels",
            "~first_stage.out_ch",
            "~first_stage.checkpoint",
        ]
    ch_mult, channels = FACTORS[f]
    return [
        f"first_stage.ch_mult=[{','.join(map(str, ch_mult))}]",
        f"first_stage.latent_channels={channels}",
        f"first_stage.z_channels={channels}",
        f"first_stage.resolution={SIZE}",
        f"first_stage.checkpoint={ae_run}",
    ]


def train_first_stage(f: int, args: argparse.Namespace) -> tuple[Path, float]:
    run_dir = args.out / f"kl_f{f}"
    ch_mult, channels = FACTORS[f]  # type: ignore[misc]
    start = time.perf_counter()
    ldmkit(
        "train", "experiment=fmnist_kl_f4", f"image_size={SIZE}", f"data.path={args.data}",
        f"run_dir={run_dir}", f"first_stage.ch_mult=[{','.join(map(str, ch_mult))}]",
        f"first_stage.latent_channels={channels}", f"first_stage.z_channels={channels}",
        f"first_stage.resolution={SIZE}", "trainer.batch_size=16",
        f"trainer.max_minutes={args.ae_minutes}", "trainer.max_steps=1000000",
        "trainer.val_every=1000000", "trainer.num_threads=1",
        "trainer.progress=false", "trainer.tensorboard=false",
    )  # fmt: skip
    return run_dir, time.perf_counter() - start


def last_value(csv_file: Path, column: str) -> float | None:
    import csv

    with open(csv_file, newline="", encoding="utf-8") as handle:
        values = [row[column] for row in csv.DictReader(handle) if row.get(column)]
    return float(values[-1]) if values else None


class Judge:
    """Class accuracy, Fréchet distance and KID of samples in the classifier's features."""

    def __init__(self) -> None:
        from ldmkit.evaluation.classifier import fashion_mnist_arrays, to_model_input
        from ldmkit.evaluation.demo_summary import ensure_classifier
        from ldmkit.evaluation.frechet import FeatureStats

        self.classifier, self.real_accuracy, _ = ensure_classifier()
        images, _ = fashion_mnist_arrays("test")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1000]
        self.real = self.features(to_model_input(images[order.numpy()]))
        self.real_stats = FeatureStats(self.real.shape[1])
        self.real_stats.update(self.real)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.classifier.features(chunk) for chunk in images.split(500)])

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        from ldmkit.evaluation.frechet import (
            FeatureStats,
            frechet_distance_from_stats,
            kernel_distance,
        )

        feats = self.features(images)
        with torch.no_grad():
            accuracy = float((self.classifier.head(feats).argmax(1) == labels).float().mean())
        stats = FeatureStats(feats.shape[1])
        stats.update(feats)
        kid, kid_std = kernel_distance(self.real, feats, subset_size=len(feats))
        return {
            "accuracy": accuracy,
            "frechet": frechet_distance_from_stats(stats, self.real_stats),
            "kid": kid,
            "kid_std": kid_std,
        }


def draw(pipeline_dir: Path, args: argparse.Namespace, labels: torch.Tensor) -> torch.Tensor:
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    pipe = Pipeline.load(pipeline_dir).eval()
    pipe.sampler = get_registry().create("sampler", "ddim", steps=args.sample_steps)
    out = [
        pipe.sample({"label": labels[i : i + 100]}, seed=i, guidance_scale=args.guidance).cpu()
        for i in range(0, len(labels), 100)
    ]
    return torch.cat(out)


def run_factor(f: int, args: argparse.Namespace, judge: Judge) -> dict[str, Any]:
    torch.set_num_threads(1)
    entry: dict[str, Any] = {"f": f, "space": "pixel" if f == 1 else "KL latent"}
    ae_run = None
    if FACTORS[f] is not None:
        ae_run, seconds = train_first_stage(f, args)
        entry["first_stage_wall_s"] = round(seconds, 1)
        entry["first_stage_val_psnr"] = last_value(ae_run / "metrics.csv", "val/psnr")
    latent = SIZE // f
    entry["latent"] = f"{1 if f == 1 else FACTORS[f][1]}x{latent}x{latent}"  # type: ignore[index]
    run_dir = args.out / f"ldm_f{f}"
    labels = torch.arange(10).repeat(args.per_class)
    entry["points"] = []
    for k in range(1, args.evals + 1):
        minutes = args.minutes * k / args.evals
        ldmkit(
            "train", "experiment=fmnist_ldm_kl_f4", f"image_size={SIZE}", f"data.path={args.data}",
            f"run_dir={run_dir}", *first_stage_overrides(f, ae_run), *UNET,
            f"trainer.max_minutes={minutes}", "trainer.max_steps=1000000", "trainer.batch_size=32",
            "trainer.lr=1e-3", "trainer.warmup_steps=100", "trainer.num_threads=1",
            "trainer.latent_cache=false",  # every run pays its own encoder inside the budget
            "trainer.checkpoint_every=1000000", "trainer.val_every=1000000",
            "trainer.sample_every=1000000", "trainer.progress=false", "trainer.tensorboard=false",
        )  # fmt: skip
        state = json.loads(
            sorted((run_dir / "checkpoints").glob("step_*/meta.json"))[-1].read_text()
        )
        images = draw(run_dir / "pipeline", args, labels)
        point = {"train_minutes": minutes, "steps": state["step"], **judge.score(images, labels)}
        entry["points"].append(point)
        print(json.dumps({"f": f, **point}), flush=True)
        torch.save(images[:20], run_dir / "samples_last.pt")  # two of each class
    return entry


def throughput(f: int, args: argparse.Namespace) -> float:
    """Images per second of ``Pipeline.sample`` (loop with guidance + decode), batch 50."""
    from ldmkit.pipeline import Pipeline
    from ldmkit.plugins import get_registry

    pipe = Pipeline.load(args.out / f"ldm_f{f}" / "pipeline").eval()
    pipe.sampler = get_registry().create("sampler", "ddim", steps=args.sample_steps)
    labels = {"label": torch.arange(50) % 10}
    pipe.sample(labels, seed=0, guidance_scale=args.guidance)  # warm-up
    start = time.perf_counter()
    pipe.sample(labels, seed=1, guidance_scale=args.guidance)
    return 50 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="stage-2 training minutes per f")
    parser.add_argument(
        "--ae-minutes",
        type=float,
        default=None,
        help="first-stage minutes (default: half --minutes)",
    )
    parser.add_argument("--evals", type=int, default=3, help="scored checkpoints per run")
    parser.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion_mnist")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/compression_tradeoff")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/compression_tradeoff.json"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/compression_tradeoff.png")
    args = parser.parse_args(argv)
    args.ae_minutes = args.ae_minutes or args.minutes / 2
    started = time.perf_counter()
    judge = Judge()
    # the costliest chain (pixel space) first, so the two workers finish together
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda f: run_factor(f, args, judge), sorted(args.factors)))
    torch.set_num_threads(max(1, args.jobs))
    for entry in runs:
        entry["images_per_s"] = throughput(entry["f"], args)
        print(json.dumps({"f": entry["f"], "images_per_s": entry["images_per_s"]}), flush=True)
    results = {
        "image_size": SIZE,
        "data": "Fashion-MNIST, bicubic-upscaled 28 -> 64, grayscale",
        "stage2_minutes": args.minutes,
        "first_stage_minutes": args.ae_minutes,
        "unet": UNET,
        "sampling": f"DDIM {args.sample_steps} steps, guidance {args.guidance}, {10 * args.per_class} samples",
        "classifier_real_accuracy": judge.real_accuracy,
        "throughput_threads": max(1, args.jobs),
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args)
    return results


def plot(results: dict[str, Any], args: argparse.Namespace) -> None:
    from plotting import stacked_line_charts
    from torchvision.utils import make_grid, save_image

    runs = results["runs"]
    stacked_line_charts(
        args.plot,
        [
            {
                "series": {
                    f"LDM-{r['f']}": [(p["train_minutes"], scale * p[key]) for p in r["points"]]
                    for r in runs
                },
                "ylabel": label,
            }
            for key, label, scale in (
                ("accuracy", "class accuracy, %", 100),
                ("frechet", "Frechet distance (lower is better)", 1),
            )
        ],
        xlabel="stage-2 training minutes (1 CPU thread)",
        title="LDM-f on Fashion-MNIST 64x64, equal training time",
    )
    rows = [torch.load(args.out / f"ldm_f{r['f']}" / "samples_last.pt") for r in runs]
    grid = make_grid((torch.cat(rows) + 1) / 2, nrow=20, padding=2, pad_value=1.0)
    save_image(grid, args.plot.with_name(args.plot.stem + "_samples.png"))


if __name__ == "__main__":
    main()
