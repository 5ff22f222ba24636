"""Rate-distortion of the first stages (issue 14, item 2; the shape of the paper's Tab. 8):
KL-reg and VQ-reg autoencoders at f = 4, 8, 16 trained with the same step budget on
Fashion-MNIST (32x32, grayscale), then PSNR, SSIM and the Fréchet distance (the project's
Fashion-MNIST feature network) of their reconstructions of held-out test images.

Each model is the CPU-sized first stage of ``experiment=fmnist_kl_f4`` / ``fmnist_vq_f4``
with one more down-sampling level per doubling of f (``ch_mult`` [1,2,4], [1,2,4,4],
[1,2,4,4,4]) and the paper's latent channels for KL/VQ at that factor where they agree
(c = 3 at f=4, 4 at f=8, 8 at f=16; the same c for KL and VQ, so the two differ only in the
regularizer). Everything runs through the real CLI (``ldmkit train`` / ``ldmkit evaluate``)::

    .venv/bin/python benchmarks/rate_distortion.py --steps 600 --jobs 2
    .venv/bin/python benchmarks/rate_distortion.py --minutes 2.5 --jobs 2   # a time budget instead

Writes ``benchmarks/results/rate_distortion.json`` and ``docs/images/rate_distortion.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
FACTORS = {4: ([1, 2, 4], 3), 8: ([1, 2, 4, 4], 4), 16: ([1, 2, 4, 4, 4], 8)}


def run(kind: str, f: int, args: argparse.Namespace) -> dict:
    exe = Path(sys.executable).with_name("ldmkit")
    ch_mult, channels = FACTORS[f]
    run_dir = args.out / f"{kind}_f{f}"
    common = [
        f"experiment=fmnist_{kind}_f4",
        f"data.path={args.data}",
        f"run_dir={run_dir}",
        f"first_stage.ch_mult=[{','.join(map(str, ch_mult))}]",
        f"first_stage.latent_channels={channels}",
        f"first_stage.z_channels={channels}",
    ]
    start = time.perf_counter()
    subprocess.run(
        [
            str(exe),
            "train",
            *common,
            *(
                [f"trainer.max_minutes={args.minutes}", "trainer.max_steps=1000000", "trainer.val_every=1000000"]
                if args.minutes
                else ["trainer.max_minutes=null", f"trainer.max_steps={args.steps}", f"trainer.val_every={args.steps}"]
            ),
            "trainer.progress=false",
            "trainer.tensorboard=false",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    train_s = time.perf_counter() - start
    report = run_dir / "rd_eval.json"
    subprocess.run(
        [
            str(exe),
            "evaluate",
            *common,
            f"eval.max_images={args.eval_images}",
            "eval.fid_features=fashion_mnist",
            f"eval.output={report}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    metrics = json.loads(report.read_text())
    entry = {
        "regularizer": kind,
        "f": f,
        "latent": f"{channels}x{32 // f}x{32 // f}",
        "steps": steps_of(run_dir),
        "psnr": metrics["psnr"],
        "ssim": metrics["ssim"],
        "frechet": metrics.get("frechet_distance"),
        "kid": metrics.get("kid"),
        "train_s": round(train_s, 1),
    }
    print(json.dumps(entry), flush=True)
    return entry


def steps_of(run_dir: Path) -> int:
    """The step of the run's newest checkpoint."""
    newest = sorted((run_dir / "checkpoints").glob("step_*/meta.json"))[-1]
    return int(json.loads(newest.read_text())["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--minutes", type=float, default=None, help="a training-time budget per run instead of --steps")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (one thread each)")
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=ROOT / "data/fashion_mnist")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/rate_distortion")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/rate_distortion.json"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/rate_distortion.png")
    args = parser.parse_args()
    jobs = [(kind, f) for f in FACTORS for kind in ("kl", "vq")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run(*job, args), jobs))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    budget = {"minutes": args.minutes} if args.minutes else {"steps": args.steps}
    args.json.write_text(json.dumps({**budget, "runs": results}, indent=2) + "\n")
    plot(results, args.plot, f"{args.minutes} training minutes each" if args.minutes else f"{args.steps} steps each")


def plot(results: list[dict], path: Path, budget: str) -> None:
    from plotting import stacked_line_charts

    stacked_line_charts(
        path,
        [
            {
                "series": {
                    kind.upper(): [
                        (r["f"], r[key]) for r in results if r["regularizer"] == kind and r[key] is not None
                    ]
                    for kind in ("kl", "vq")
                },
                "ylabel": label,
            }
            for key, label in (
                ("psnr", "PSNR, dB (higher is better)"),
                ("frechet", "Frechet distance (lower is better)"),
            )
        ],
        xlabel="downsampling factor f",
        title=f"first stages on Fashion-MNIST, {budget}",
    )


if __name__ == "__main__":
    main()
