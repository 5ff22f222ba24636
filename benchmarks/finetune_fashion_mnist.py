"""Issue 28's figures: fine-tuning vs training from scratch on Fashion-MNIST.

1. A *base* model, the demo's class-conditional LDM recipe trained on classes 0-4 only — from
   the user's side: the classes are written as an image folder (one sub-folder per class),
   prepared with ``ldmkit data prepare image_folder`` and trained with ``num_classes=5``.
2. Four runs on all 10 classes with the same step budget and recipe, each in the latent space
   of the same first stage (the demo's KL-f4):

   * ``scratch``: a fresh denoiser and conditioner;
   * ``full``: ``trainer.init_from=<base>`` with ``trainer.init_strict=false`` (the class table
     grows from 5+1 to 10+1 rows: rows 0-4 and the null row are kept, rows 5-9 are new);
   * ``lora4``, ``lora16``: the same start, LoRA of rank 4 / 16 on the denoiser's attention
     projections, the conditioner's class table trained in full (the new classes need rows).

Each run is stopped at every evaluation step and resumed (resume is bitwise exact, so this
is one run); at each, 10 samples per class (DDIM 50, guidance 3, the same seeds for every run)
are judged by the project's Fashion-MNIST classifier: class accuracy (all, classes 0-4, 5-9)
and the Fréchet distance of its features to 1,000 real test images.

    .venv/bin/python benchmarks/finetune_fashion_mnist.py --steps 900 --eval 150 300 600 900

Writes ``benchmarks/results/finetune_fashion_mnist.json`` and
``docs/images/finetune_fashion_mnist.png`` (accuracy and Fréchet distance against steps).
Budgets are steps, so the figures do not depend on the machine's load; the wall times do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

LDMKIT = str(Path(sys.executable).with_name("ldmkit"))
# the demo's stage-2 recipe (scripts/demo.sh): experiment=fmnist_ldm_kl_f4 with its tuning
RECIPE = ["experiment=fmnist_ldm_kl_f4", "trainer.lr=1.0e-3", "trainer.warmup_steps=100",
          "denoiser.attention_resolutions=[2]", "trainer.max_minutes=null", "trainer.progress=false",
          "trainer.sample_every=0", "trainer.val_every=0", "trainer.keep_checkpoints=1"]  # fmt: skip
BASE_CLASSES = 5
# the runs the PNG shows (every run is in the JSON and the RESULTS.md table)
PLOTTED = ("scratch", "full", "lora4", "lora16", "lora8_conv_lr3x")


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - started


def write_subset_folder(folder: Path, classes: int) -> None:
    """Fashion-MNIST's train images of the first ``classes`` classes as PNG files, one
    sub-folder per class (``0-t-shirt_top``, ...: sorted, the folder order is the label)."""
    import numpy as np
    from PIL import Image

    from ldmkit.data.sources.fashion_mnist import CLASSES
    from ldmkit.evaluation.classifier import fashion_mnist_arrays

    if (folder / ".complete").is_file():
        return
    images, labels = fashion_mnist_arrays("train")
    for c in range(classes):
        sub = folder / f"{c}-{CLASSES[c].lower().replace('/', '_')}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c):
            Image.fromarray(images[i]).save(sub / f"{i:05d}.png")
    (folder / ".complete").write_text("")


def evaluate(pipeline_dir: Path, per_class: int, real_stats: Any, classifier: Any) -> dict[str, float]:
    import torch

    from ldmkit.evaluation.frechet import FeatureStats, frechet_distance_from_stats
    from ldmkit.pipeline import Pipeline

    pipe = Pipeline.load(pipeline_dir).eval()
    labels = torch.arange(10).repeat(per_class)
    images = torch.cat([
        pipe.sample({"label": chunk}, seed=first, guidance_scale=3.0).cpu()
        for first, chunk in zip(range(0, len(labels), 100), labels.split(100), strict=True)
    ])  # fmt: skip
    with torch.no_grad():
        feats = classifier.features(images)
        right = classifier.head(feats).argmax(1) == labels
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    return {
        "accuracy": float(right.float().mean()),
        "accuracy_old": float(right[labels < BASE_CLASSES].float().mean()),
        "accuracy_new": float(right[labels >= BASE_CLASSES].float().mean()),
        "frechet": frechet_distance_from_stats(stats, real_stats),
    }


def real_features() -> tuple[Any, Any]:
    """The classifier, and its feature statistics of 1,000 real test images."""
    import torch

    from ldmkit.evaluation.classifier import fashion_mnist_arrays, load_classifier, to_model_input
    from ldmkit.evaluation.frechet import FeatureStats

    classifier = load_classifier()
    test_images, _ = fashion_mnist_arrays("test")
    order = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(0))[:1000]
    with torch.no_grad():
        real = classifier.features(to_model_input(test_images[order.numpy()]))
    stats = FeatureStats(real.shape[1])
    stats.update(real)
    return classifier, stats


def trainable_report(run_dir: Path) -> dict[str, Any]:
    """What a run trains and exports: the trained tensors' element count (the adapter's for a
    LoRA run, else the denoiser's and conditioner's) and the exported files' sizes."""
    from safetensors import safe_open

    pipeline = run_dir / "pipeline"
    adapter = pipeline / "adapter.safetensors"
    file = adapter if adapter.is_file() else pipeline / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        keys = [k for k in f.keys() if adapter.is_file() or k.startswith(("denoiser.", "conditioner."))]
        numel = sum(f.get_tensor(k).numel() for k in keys)
    with safe_open(str(run_dir / "base" / "model.safetensors" if (run_dir / "base").is_dir() else file), "pt") as f:
        model = sum(f.get_tensor(k).numel() for k in f.keys() if k.startswith(("denoiser.", "conditioner.")))
    return {"trained_parameters": numel, "model_parameters": model,
            "exported_mb": sum(p.stat().st_size for p in pipeline.glob("*.safetensors")) / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-stage", type=Path, default=ROOT / "runs/demo/kl_f4",
                        help="a trained KL-f4 stage-1 run (scripts/demo.sh makes one)")
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion_mnist")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/finetune")
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--eval", type=int, nargs="+", default=[150, 300, 600, 900])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--runs", nargs="+", default=["scratch", "full", "lora4", "lora16"])
    parser.add_argument("--only-base", action="store_true", help="stop after the base model")
    parser.add_argument("--collect", action="store_true", help="only gather the runs' points into --json and plot")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/finetune_fashion_mnist.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/finetune_fashion_mnist.png")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    common = [f"first_stage.checkpoint={args.first_stage}"]

    # 1. the base model: classes 0-4 from an image folder
    folder, prepared = args.work / "classes_0_4", args.work / "classes_0_4_prepared"
    base = args.work / "base"
    timings: dict[str, float] = {}
    if not (base / "pipeline" / "config.yaml").is_file():
        write_subset_folder(folder, BASE_CLASSES)
        if not (prepared / "manifest.json").is_file():
            timings["prepare"] = run([LDMKIT, "data", "prepare", "image_folder", f"path={folder}",
                                      f"out={prepared}"], log)  # fmt: skip
        timings["base"] = run([LDMKIT, "train", *RECIPE, *common, "data=image_folder", f"data.path={prepared}",
                               "data.channels=1", "data.crop=center", "data.flip=false",
                               f"conditioner.num_classes={BASE_CLASSES}", f"run_dir={base}",
                               f"trainer.max_steps={args.base_steps}", "trainer.val_batches=0"], log)  # fmt: skip
    if args.only_base:
        return

    classifier, real_stats = (None, None) if args.collect else real_features()

    # a number as scale_factor: the base's is carried (the preset's scale_by_std would estimate anew)
    finetune = [f"trainer.init_from={base / 'pipeline'}", "trainer.init_strict=false", "scale_factor=1.0"]
    variants = {
        "scratch": [],
        "full": finetune,
        # the new classes need rows of the class table: LoRA on the conditioner's embedding too
        "lora4": [*finetune, "trainer.lora.rank=4", "trainer.lora.conditioner=true"],
        "lora16": [*finetune, "trainer.lora.rank=16", "trainer.lora.conditioner=true"],
        # the class token reaches the UNet only through attention at one level: LoRA on the
        # residual blocks' convolutions too (LoCon-style) gives the new classes capacity
        "lora8_conv": [*finetune, "trainer.lora.rank=8", "trainer.lora.conditioner=true",
                       "trainer.lora.targets=['denoiser.*.attn[12].to_[qkv]','denoiser.*.attn[12].to_out.0',"
                       "'denoiser.*.in_layers.2','denoiser.*.out_layers.3']"],
    }
    # measured before class_label drew new rows from the known rows' distribution (fresh
    # N(0, 1) rows): kept for the comparison, rerun only with the code of that time
    variants["full_fresh_rows"] = finetune
    variants["lora8_conv_lr3x_fresh_rows"] = [*variants["lora8_conv"], "trainer.lr=3.0e-3"]
    # LoRA updates start at zero (B = 0): the same adapter with a 3x learning rate
    variants["lora8_conv_lr3x"] = [*variants["lora8_conv"], "trainer.lr=3.0e-3"]
    results: dict[str, Any] = {"steps": args.steps, "eval_steps": args.eval, "per_class": args.per_class,
                               "base_steps": args.base_steps, "recipe": RECIPE, "runs": {}}  # fmt: skip
    for name in [] if args.collect else args.runs:
        run_dir = args.work / name
        points_file = run_dir / "points.json"
        entry = json.loads(points_file.read_text()) if points_file.is_file() else {"overrides": variants[name], "points": []}
        done = {p["step"] for p in entry["points"]}
        for step in args.eval:
            if step in done:
                continue
            seconds = run([LDMKIT, "train", *RECIPE, *common, f"data.path={args.data}", "data.channels=1",
                           f"run_dir={run_dir}", f"trainer.max_steps={step}",
                           f"trainer.checkpoint_every={step}", *variants[name]], log)  # fmt: skip
            point = {"step": step, "train_seconds": seconds, **evaluate(run_dir / "pipeline", args.per_class,
                                                                        real_stats, classifier)}  # fmt: skip
            entry["points"].append(point)
            print(name, json.dumps(point), flush=True)
            points_file.write_text(json.dumps(entry, indent=2) + "\n")
        entry.update(trainable_report(run_dir))
        points_file.write_text(json.dumps(entry, indent=2) + "\n")
    for name in variants:
        if (args.work / name / "points.json").is_file():
            results["runs"][name] = json.loads((args.work / name / "points.json").read_text())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)


def plot(results: dict[str, Any], path: Path) -> None:
    from plotting import stacked_line_charts

    runs = {name: run for name, run in results["runs"].items() if name in PLOTTED}
    stacked_line_charts(
        path,
        [
            {"series": {name: [(p["step"], scale * p[key]) for p in run["points"]] for name, run in runs.items()},
             "ylabel": label}
            for key, label, scale in (("accuracy", "class accuracy, %", 100),
                                      ("frechet", "Frechet distance (lower is better)", 1))
        ],  # fmt: skip
        xlabel="training steps on all 10 classes",
        title="fine-tuning a 5-class model to 10 classes vs training from scratch",
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
