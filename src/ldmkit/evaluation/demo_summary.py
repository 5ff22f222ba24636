"""The end of ``./scripts/demo.sh``: one summary of what the demo trained and whether it worked.

It reads what the demo wrote and trains nothing of the demo's::

    python -m ldmkit.evaluation.demo_summary --demo-dir runs/demo --floor 0.75

* the autoencoder's reconstruction PSNR/SSIM on held-out (test) images, from the newest
  ``<demo>/kl_f4/eval/autoencoder_*_step_*.json`` that ``ldmkit evaluate`` wrote;
* the class accuracy of the samples ``ldmkit sample`` wrote (``<demo>/samples.json`` lists
  each sample's PNG and its label): the Fashion-MNIST classifier of
  :mod:`ldmkit.evaluation.classifier`, trained on real images only, judges whether each
  sample shows the class it was generated for. Its own accuracy on the 10,000 real test
  images is the ceiling to read the samples' figure against;
* where each file is.

It exits 1 when the samples' accuracy is below ``--floor`` (so a demo whose model learned
nothing, e.g. one starved of training steps, fails), 2 when a file it needs is missing.
Without the classifier's weights (a fresh machine) it trains them first, for a fixed number
of epochs (``--classifier-epochs``, default 2: 938 steps of batch 128), and keeps them in
``$LDMKIT_CACHE`` (default ``~/.cache/ldmkit``) for the next run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SUMMARY_FILE = "summary.json"
DEFAULT_FLOOR = 0.75
NUM_CLASSES = 10


class DemoSummaryError(RuntimeError):
    """A file the summary needs is missing or unreadable (the message names it)."""


# -- what the demo wrote ------------------------------------------------------------------
def newest_report(run_dir: Path, stage: str) -> tuple[dict[str, Any], Path] | None:
    """The newest (by step) ``ldmkit evaluate stage=STAGE`` report in ``run_dir/eval``, None
    where there is none."""
    reports = []
    for path in (run_dir / "eval").glob(f"{stage}_*_step_*.json"):
        match = re.search(r"_step_(\d+)\.json$", path.name)
        if match:
            reports.append((int(match.group(1)), path))
    if not reports:
        return None
    _, path = max(reports)
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError) as err:
        raise DemoSummaryError(f"cannot read {path}: {err}") from err


def autoencoder_report(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest ``ldmkit evaluate`` report of the stage-1 run in ``run_dir`` (by step)."""
    found = newest_report(run_dir, "autoencoder")
    if found is None:
        raise DemoSummaryError(
            f"no autoencoder evaluation in {run_dir / 'eval'}; run `ldmkit evaluate "
            f"experiment=fmnist_kl_f4 run_dir={run_dir}` first"
        )
    return found


def ldm_report(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest ``ldmkit evaluate stage=ldm`` report of the LDM run in ``run_dir`` (by step),
    None where there is none (it is optional)."""
    return newest_report(run_dir, "ldm")


def load_samples(settings_file: Path, *, label_key: str = "label") -> tuple[Tensor, Tensor]:
    """The samples ``ldmkit sample`` listed in ``settings_file`` (its ``<out>.json``) as
    N×1×H×W in [-1, 1], and their labels."""
    from PIL import Image

    try:
        record = json.loads(settings_file.read_text())
    except FileNotFoundError as err:
        raise DemoSummaryError(f"no samples: {settings_file} does not exist (run `ldmkit sample ... --out "
                               f"{settings_file.with_suffix('.png')}`)") from err
    except (OSError, ValueError) as err:
        raise DemoSummaryError(f"cannot read {settings_file}: {err}") from err
    entries = record.get("images") or []
    if not entries:
        raise DemoSummaryError(f"{settings_file} lists no images")
    images, labels = [], []
    for entry in entries:
        if label_key not in entry:
            raise DemoSummaryError(f"{settings_file}: sample {entry.get('file')} has no {label_key!r}; "
                                   f"the summary needs class-conditional samples")
        path = settings_file.parent / entry["file"]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.float32)
        except OSError as err:
            raise DemoSummaryError(f"cannot read sample {path}: {err}") from err
        images.append(torch.from_numpy(pixels / 127.5 - 1.0)[None])
        labels.append(int(entry[label_key]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


# -- the judge ------------------------------------------------------------------------------
def ensure_classifier(path: Path | None = None, *, epochs: int = 2, log=print) -> tuple[Any, float, Path]:
    """The Fashion-MNIST classifier (trained first, for ``epochs``, where its file is missing)
    and its accuracy on the real test images."""
    from ldmkit.evaluation.classifier import (
        default_classifier_path,
        load_classifier,
        train_fashion_mnist_classifier,
    )

    path = Path(path) if path is not None else default_classifier_path()
    if not path.is_file():
        log(f"no classifier at {path}: training it ({epochs} epochs of Fashion-MNIST's 60,000 "
            f"training images; about 2.5 minutes per epoch on 2 quiet CPU cores)")
        started = time.perf_counter()
        trained = train_fashion_mnist_classifier(path, epochs=epochs)
        log(f"classifier trained in {time.perf_counter() - started:.0f} s, test accuracy "
            f"{trained['test_accuracy']:.1%}")
    classifier = load_classifier(path)
    return classifier, real_accuracy(classifier, path), path


def real_accuracy(classifier: Any, path: Path) -> float:
    """The classifier's accuracy on the real test split: recorded in its file when it was
    trained, else measured now."""
    from ldmkit.safetensors_io import read_safetensors_metadata

    recorded = read_safetensors_metadata(path).get("test_accuracy")
    if recorded is not None:
        return float(recorded)
    from ldmkit.evaluation.classifier import fashion_mnist_arrays, to_model_input

    images, labels = fashion_mnist_arrays("test")
    return class_accuracy(classifier, to_model_input(images), torch.from_numpy(labels.astype(np.int64)))[0]


@torch.no_grad()
def class_accuracy(classifier: Any, images: Tensor, labels: Tensor) -> tuple[float, list[float | None]]:
    """(overall accuracy, per-class accuracy: None for a class with no sample)."""
    predicted = torch.cat([classifier(chunk).argmax(1) for chunk in images.split(500)])
    hits = predicted == labels
    per_class = [float(hits[labels == c].float().mean()) if bool((labels == c).any()) else None
                 for c in range(NUM_CLASSES)]
    return float(hits.float().mean()), per_class


# -- the summary ----------------------------------------------------------------------------
def summarize(
    demo_dir: Path, *, floor: float, classifier: Any, classifier_accuracy: float,
    classifier_path: Path, samples_file: Path | None = None,
) -> dict[str, Any]:
    """Everything the summary prints, as one JSON-ready dict (``passed``: accuracy >= floor)."""
    samples_file = samples_file or demo_dir / "samples.json"
    report, report_path = autoencoder_report(demo_dir / "kl_f4")
    images, labels = load_samples(samples_file)
    accuracy, per_class = class_accuracy(classifier, images, labels)
    record = json.loads(samples_file.read_text())
    held_out = ldm_report(demo_dir / "ldm")
    summary = {
        "autoencoder": {
            "psnr": report.get("psnr"), "ssim": report.get("ssim"),
            "num_images": report.get("num_images"), "split": report.get("split"),
            "step": report.get("step"),
        },
        "samples": {
            "count": len(labels), "accuracy": accuracy, "per_class": per_class,
            "guidance_scale": record.get("guidance_scale"), "sampler": record.get("sampler"),
        },
        "classifier": {"accuracy_on_real": classifier_accuracy, "path": str(classifier_path)},
        "floor": floor,
        "passed": accuracy >= floor,
        "files": {
            "autoencoder run": str(demo_dir / "kl_f4"),
            "autoencoder evaluation": str(report_path),
            "reconstruction grids": str(demo_dir / "kl_f4" / "images"),
            "LDM run": str(demo_dir / "ldm"),
            "LDM pipeline (ldmkit sample --checkpoint)": str(demo_dir / "ldm" / "pipeline"),
            "sample grid": str(samples_file.parent / record.get("grid", samples_file.with_suffix(".png").name)),
            "samples, one PNG each": str(samples_file.parent / samples_file.stem),
            "sample settings": str(samples_file),
            "classifier": str(classifier_path),
            "this summary": str(demo_dir / SUMMARY_FILE),
        },
    }
    if held_out is not None:
        report, path = held_out
        keys = ("num_images", "split", "step", "class_accuracy", "frechet_distance", "kid", "frechet_features",
                "guidance_scale", "steps")  # fmt: skip
        summary["held_out"] = {k: report.get(k) for k in keys}
        summary["files"] = {**summary["files"], "LDM evaluation": str(path)}
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    ae, samples, clf = summary["autoencoder"], summary["samples"], summary["classifier"]
    sampler = samples.get("sampler") or {}
    sampler_text = f"{sampler.get('name', '?')}, {sampler.get('steps', '?')} steps" if sampler else "?"
    per_class = "  ".join(f"{c}:{'-' if a is None else f'{a:.0%}'}" for c, a in enumerate(samples["per_class"]))
    verdict = "PASS" if summary["passed"] else "FAIL"
    lines = [
        "== demo summary",
        f"autoencoder (step {ae['step']}): PSNR {ae['psnr']:.2f} dB, SSIM {ae['ssim']:.3f} on "
        f"{ae['num_images']} held-out {ae['split']} images",
        f"samples: {samples['count']} ({sampler_text}, guidance {samples['guidance_scale']}); the "
        f"classifier finds the intended class in {samples['accuracy']:.1%} of them (on real test "
        f"images it is right {clf['accuracy_on_real']:.1%} of the time)",
        f"  per class: {per_class}",
        *_held_out_lines(summary.get("held_out")),
        f"{verdict}: sample accuracy {samples['accuracy']:.1%} "
        f"{'>=' if summary['passed'] else '<'} floor {summary['floor']:.0%}",
        "files:",
    ]
    width = max(len(k) for k in summary["files"])
    lines += [f"  {name:<{width}}  {path}" for name, path in summary["files"].items()]
    return "\n".join(lines)


def _held_out_lines(held: Mapping[str, Any] | None) -> list[str]:
    """What ``ldmkit evaluate stage=ldm`` found, where the demo ran it."""
    if held is None:
        return []
    judged = held.get("class_accuracy")
    fid, kid = held.get("frechet_distance"), held.get("kid")
    parts = [f"the classifier finds their class in {judged:.1%}"] if judged is not None else []
    if fid is not None:
        parts.append(f"Frechet distance {fid:.2f}, KID {kid:.4f} to those images ({held.get('frechet_features')} features)")
    return [f"held-out conditions (ldmkit evaluate): {held['num_images']} samples for the labels of as many "
            f"{held['split']} images ({held.get('steps')} steps, guidance {held.get('guidance_scale')}): "
            + ("; ".join(parts) or "no metric (no feature network)")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldmkit.evaluation.demo_summary",
        description="Summarize a ./scripts/demo.sh run: autoencoder PSNR, the samples' class accuracy "
        "against the classifier's on real images, where each file is. Exits 1 below --floor.",
    )
    parser.add_argument("--demo-dir", type=Path, required=True, help="the demo's output folder")
    parser.add_argument("--samples", type=Path, default=None,
                        help="the <out>.json `ldmkit sample` wrote (default <demo-dir>/samples.json)")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR,
                        help=f"lowest acceptable class accuracy of the samples (default {DEFAULT_FLOOR})")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="the classifier's safetensors (default: $LDMKIT_CACHE/fashion_mnist_classifier"
                             ".safetensors; trained there first if missing)")
    parser.add_argument("--classifier-epochs", type=int, default=2,
                        help="epochs to train the classifier where it is missing (default 2)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.floor <= 1.0:
        parser.error(f"--floor must be in [0, 1], got {args.floor}")
    try:
        classifier, accuracy, path = ensure_classifier(args.classifier, epochs=args.classifier_epochs)
        summary = summarize(args.demo_dir, floor=args.floor, classifier=classifier,
                            classifier_accuracy=accuracy, classifier_path=path, samples_file=args.samples)
    except DemoSummaryError as err:
        print(f"demo summary: {err}", file=sys.stderr)
        return 2
    from ldmkit.io import atomic_write_text

    atomic_write_text(args.demo_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
