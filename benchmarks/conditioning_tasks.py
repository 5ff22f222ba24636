"""Issue 8: the four conditional LDM tasks, measured on their trained pipelines.

After training (see benchmarks/RESULTS.md, "Conditioning tasks"):

    python benchmarks/conditioning_tasks.py            # all tasks, pipelines under runs/

writes ``benchmarks/results/conditioning_tasks.json`` and the pictures
``docs/images/conditioning_{t2i,semantic,sr,inpaint}.png``. Every sampler call uses the
pipeline's own sampler (DDIM, 50 steps, EMA weights) and fixed seeds.

* **t2i** (runs/t2i_bert, runs/t2i_minilm): prompts = real captions, ``--per-class`` of each of
  the 8 categories from the held-out ``val`` split (and as many from ``train``), ``--seeds``
  samples each, at guidance 1 and 3. Figure: how often the category classifier (trained on real
  train images only, conditioning_eval.cutout_classifier) puts a sample into the category of
  the prompt it was made from; chance = 1/8. Reference: the classifier's accuracy on the real
  val images (all, and the images whose captions were the prompts).
* **semantic** (runs/scenes_semantic): the real val maps at the training size (32, nearest-
  resized like the loader) and at 2x (64, the prepared maps). Figure: mIoU between the map asked
  for and the segmenter's (conditioning_eval.scene_segmenter) reading of the sample; reference:
  the segmenter's mIoU on the real val scenes at the same size.
* **sr** (runs/fmnist_sr4): the first ``--n`` Fashion-MNIST test images (32x32), degraded by the
  conditioner's own bicubic downsampling to 8x8. LDM vs bicubic upsampling of the same input:
  PSNR and SSIM against the original, and the Fréchet distance to the originals in the
  Fashion-MNIST classifier's features.
* **inpaint** (runs/fmnist_inpaint): the same test images, one random box each (the
  conditioner's ``random_masks``, seeded). PSNR of the known region (LDM output vs original,
  outside the box) next to the first stage's reconstruction PSNR on the same images and region;
  Fréchet distance of composites real-outside + filled-inside vs the originals, LDM fill vs
  mean fill (conditioning_eval's docstring defines both).

``--cli-check`` also runs each pipeline once through ``ldmkit sample --checkpoint ... --cond``
and records the exit status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conditioning_eval as ce  # noqa: E402

from ldmkit import Pipeline, visualize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- pictures --------------------------------------------------------------------------------
def to_pil(image: torch.Tensor, size: int) -> Image.Image:
    array = (ce.to_unit(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mode = "L" if array.shape[2] == 1 else "RGB"
    pil = Image.fromarray(array[..., 0] if mode == "L" else array, mode).convert("RGB")
    return pil.resize((size, size), Image.Resampling.NEAREST)


def colorize(segmentation: torch.Tensor, size: int) -> Image.Image:
    """A class map in ldmkit's palette (the one of the trainer's grids), as a PIL image."""
    rgb = visualize.colorize(segmentation[None])[0].permute(1, 2, 0).numpy()
    array = (rgb * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB").resize((size, size), Image.Resampling.NEAREST)


def grid(rows: list[list[Image.Image]], headers: list[str], labels: list[str] | None, cell: int,
         label_width: int = 0) -> Image.Image:  # fmt: skip
    """Cells of ``cell`` px, a header line per column, an optional wrapped text label per row."""
    font = ImageFont.load_default()
    pad, header_h = 4, 16
    columns = max(len(r) for r in rows)
    width = label_width + columns * (cell + pad) + pad
    height = header_h + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, header in enumerate(headers):
        draw.text((label_width + pad + j * (cell + pad), 2), header, fill="black", font=font)
    for i, row in enumerate(rows):
        y = header_h + pad + i * (cell + pad)
        if labels:
            lines = textwrap.wrap(labels[i], width=max(8, label_width // 6))[: cell // 12]
            draw.multiline_text((pad, y + 2), "\n".join(lines), fill="black", font=font, spacing=1)
        for j, image in enumerate(row):
            canvas.paste(image, (label_width + pad + j * (cell + pad), y))
    return canvas


# -- sampling ----------------------------------------------------------------------------------
@torch.no_grad()
def sample_in_batches(pipe: Pipeline, batch: dict[str, Any], *, n: int, chunk: int, seed: int,
                      **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """pipe.sample over ``chunk``-sized slices; sample i is seeded ``seed + i`` (per-sample
    seeds, so the result does not depend on ``chunk``)."""
    return pipe.sample(batch, num_samples=n, seed=seed, batch_size=chunk, **kwargs)


DEFAULT_T2I_MODELS = ["t2i_bert", "t2i_minilm"]  # the runs behind conditioning_t2i.png and the key "t2i"


def balanced_prompts(split: dict[str, Any], per_class: int, num_classes: int) -> list[int]:
    """Indices of the first ``per_class`` items of each category (key order)."""
    chosen = []
    for k in range(num_classes):
        chosen += [i for i, label in enumerate(split["label"].tolist()) if label == k][:per_class]
    return chosen


def t2i(args: argparse.Namespace) -> dict[str, Any]:
    classifier, summary = ce.cutout_classifier(args.cutouts)
    classes = summary["classes"]
    splits = {s: ce.load_split(args.cutouts, s, image_size=32) for s in ("val", "train")}
    result: dict[str, Any] = {
        "classifier": {
            k: summary[k]
            for k in ("steps", "train_images", "val_images", "accuracy", "balanced_accuracy")
        },  # fmt: skip
        "chance": 1 / len(classes),
        "per_class": args.per_class,
        "seeds": args.seeds,
        "models": {},
    }
    prompt_sets = {}
    for name, split in splits.items():
        index = balanced_prompts(split, args.per_class, len(classes))
        prompts = [split["caption"][i] for i in index] * args.seeds
        labels = split["label"][index].repeat(args.seeds)
        prompt_sets[name] = (prompts, labels)
        real_pred = ce.predict(classifier, split["image"][index]).argmax(1)
        result[f"real_{name}_prompt_images_accuracy"] = float(
            (real_pred == split["label"][index]).float().mean()
        )
    picture_prompts = [
        splits["val"]["caption"][i] for i in balanced_prompts(splits["val"], 1, len(classes))
    ]
    picture_real = splits["val"]["image"][balanced_prompts(splits["val"], 1, len(classes))]
    columns: list[tuple[str, torch.Tensor]] = [("real", picture_real)]
    for model in args.t2i_models:
        pipe = Pipeline.load(args.runs / model / "pipeline").eval()
        entry: dict[str, Any] = {}
        for guidance in (1.0, 3.0):
            for name, (prompts, labels) in prompt_sets.items():
                images = sample_in_batches(pipe, {"caption": prompts}, n=len(prompts), chunk=args.chunk,
                                           seed=args.seed, guidance_scale=guidance)  # fmt: skip
                pred = ce.predict(classifier, images).argmax(1)
                entry[f"{name}_prompts_g{guidance:g}"] = ce.accuracy_summary(
                    pred, labels, len(classes)
                )
            pictures = pipe.sample(
                {"caption": picture_prompts}, seed=args.seed, guidance_scale=guidance
            )
            columns.append((f"{model[4:]} g{guidance:g}", pictures))
        result["models"][model] = entry
    rows = [[to_pil(images[i], 64) for _, images in columns] for i in range(len(picture_prompts))]
    labels = [f"[{classes[k]}] {p}" for k, p in enumerate(picture_prompts)]
    name = "conditioning_t2i.png" if args.t2i_models == DEFAULT_T2I_MODELS else (
        "conditioning_t2i_" + "_".join(m.removeprefix("t2i_") for m in args.t2i_models) + ".png"
    )
    grid(rows, [c for c, _ in columns], labels, 64, label_width=150).save(
        args.images / name
    )
    return result


def semantic(args: argparse.Namespace) -> dict[str, Any]:
    segmenter, summary = ce.scene_segmenter(args.scenes)
    num_classes = len(summary["classes"])
    pipe = Pipeline.load(args.runs / args.semantic_run / "pipeline").eval()
    result: dict[str, Any] = {"segmenter": summary, "sizes": {}, "run": str(args.runs / args.semantic_run)}
    pictures = []
    for size, limit in ((32, args.n_scenes), (64, args.n_scenes_2x)):
        val = ce.load_split(args.scenes, "val", image_size=size, limit=limit)
        maps = val["segmentation"]
        images = sample_in_batches(
            pipe, {"segmentation": maps}, n=len(maps), chunk=args.chunk, seed=args.seed
        )
        assert images.shape[-1] == size, images.shape
        sample_score = ce.miou(ce.segment(segmenter, images), maps, num_classes)
        real_score = ce.miou(ce.segment(segmenter, val["image"]), maps, num_classes)
        result["sizes"][f"{size // 32}x"] = {
            "image_size": size, "maps": len(maps), "samples": sample_score, "real": real_score,
            "ratio": sample_score["miou"] / real_score["miou"],
        }  # fmt: skip
        pictures += [
            [colorize(maps[i], 64), to_pil(images[i], 64), to_pil(val["image"][i], 64)]
            for i in range(4)
        ]
    labels = [f"{s}x{s} map" for s in (32,) * 4 + (64,) * 4]
    name = "conditioning_semantic.png" if args.semantic_run == "scenes_semantic" else f"conditioning_{args.semantic_run}.png"
    grid(pictures, ["map", "LDM sample", "real scene"], labels, 64, label_width=70).save(args.images / name)
    return result


def fmnist_test(args: argparse.Namespace) -> torch.Tensor:
    return ce.load_split(args.fmnist, "test", image_size=32, channels=1, limit=args.n)["image"]


def sr(args: argparse.Namespace) -> dict[str, Any]:
    features = ce.fashion_mnist_features()
    pipe = Pipeline.load(args.runs / "fmnist_sr4" / "pipeline").eval()
    high = fmnist_test(args)
    low = pipe.conditioner.degrade(high)
    bicubic = F.interpolate(low, size=high.shape[-2:], mode="bicubic", align_corners=False).clamp(
        -1, 1
    )
    ldm = sample_in_batches(pipe, {"lowres": low}, n=len(low), chunk=args.chunk, seed=args.seed)
    reference = ce.feature_stats(high, features)
    result: dict[str, Any] = {
        "images": len(high),
        "input": list(low.shape[-2:]),
        "output": list(high.shape[-2:]),
    }
    for name, images in (("bicubic", bicubic), ("ldm", ldm)):
        p, s = ce.image_psnr_ssim(images, high)
        result[name] = {
            "psnr": ce.rounded(p),
            "ssim": ce.rounded(s),
            "frechet": ce.frechet(images, reference, features),
        }
    rows = [
        [to_pil(low[i], 64), to_pil(bicubic[i], 64), to_pil(ldm[i], 64), to_pil(high[i], 64)]
        for i in range(8)
    ]
    grid(rows, ["8x8 input", "bicubic", "LDM-SR", "original"], None, 64).save(
        args.images / "conditioning_sr.png"
    )
    return result


def inpaint(args: argparse.Namespace) -> dict[str, Any]:
    features = ce.fashion_mnist_features()
    pipe = Pipeline.load(args.runs / "fmnist_inpaint" / "pipeline").eval()
    real = fmnist_test(args)
    generator = torch.Generator().manual_seed(args.seed)
    mask = pipe.conditioner.random_masks(len(real), 32, 32, generator)
    ldm = sample_in_batches(
        pipe, {"image": real, "mask": mask}, n=len(real), chunk=args.chunk, seed=args.seed
    )
    # the same samples (same seeds), their latents then fitted to the kept pixels
    refined = sample_in_batches(pipe, {"image": real, "mask": mask}, n=len(real), chunk=args.chunk, seed=args.seed,
                                refine_known=args.refine_known)  # fmt: skip
    with torch.no_grad():
        reconstruction = pipe.first_stage.decode(pipe.first_stage.encode(real)).clamp(-1, 1)
    known = 1 - mask
    # known pixels whose whole f x f latent cell is known: the sampler keeps exactly these
    # cells' latents (a cell with any pixel to fill is generated), so this separates the cost
    # of the box's ragged edge on the latent grid from the rest of the known region
    f = pipe.first_stage.downsample_factor
    cells = F.interpolate(1 - F.max_pool2d(mask, f, f), scale_factor=f, mode="nearest")
    reference = ce.feature_stats(real, features)
    composite = ce.compose(real, ldm, mask)
    filled = ce.mean_fill(real, mask)
    result = {
        "images": len(real),
        "box_fraction_of_image": float(mask.mean()),
        "known_region_psnr": {
            "ldm": ce.rounded(ce.masked_psnr(ldm, real, known)),
            f"ldm_refine_known_{args.refine_known}": ce.rounded(ce.masked_psnr(refined, real, known)),
            "first_stage_reconstruction": ce.rounded(ce.masked_psnr(reconstruction, real, known)),
            "first_stage_reconstruction_full_image": ce.rounded(
                ce.image_psnr_ssim(reconstruction, real)[0]
            ),
            "known_fraction_in_fully_known_cells": float(cells.sum() / known.sum()),
            "ldm_fully_known_cells": ce.rounded(ce.masked_psnr(ldm, real, cells)),
            "first_stage_reconstruction_fully_known_cells": ce.rounded(
                ce.masked_psnr(reconstruction, real, cells)
            ),
        },
        "filled_region_frechet": {
            "ldm_composite": ce.frechet(composite, reference, features),
            f"ldm_refine_known_{args.refine_known}_composite": ce.frechet(ce.compose(real, refined, mask), reference, features),
            "mean_fill": ce.frechet(filled, reference, features),
        },
    }
    masked_view = real * known + mask * 1.0  # the box shown white
    rows = [
        [to_pil(masked_view[i], 64), to_pil(ldm[i], 64), to_pil(refined[i], 64), to_pil(filled[i], 64),
         to_pil(real[i], 64)]
        for i in range(8)
    ]  # fmt: skip
    headers = ["masked input", "LDM fill", f"+ refine {args.refine_known}", "mean fill", "original"]
    grid(rows, headers, None, 64).save(
        args.images / "conditioning_inpaint.png"
    )
    return result


# -- the real CLI ----------------------------------------------------------------------------
def cli_check(args: argparse.Namespace) -> dict[str, Any]:
    """Each pipeline once through ``ldmkit sample --checkpoint ... --cond key=value``."""
    ldmkit = str(Path(sys.executable).with_name("ldmkit"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = ce.load_split(args.scenes, "val", image_size=32, limit=1)
        Image.fromarray(scene["segmentation"][0].numpy().astype(np.uint8), "L").save(
            tmp / "map.png"
        )
        item = fmnist_test(argparse.Namespace(fmnist=args.fmnist, n=1))[0]
        gray = ((item[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(gray, "L").save(tmp / "item.png")
        Image.fromarray(gray, "L").resize((8, 8), Image.Resampling.BICUBIC).save(tmp / "small.png")
        box = np.zeros((32, 32), np.uint8)
        box[8:20, 10:24] = 255
        Image.fromarray(box, "L").save(tmp / "mask.png")
        commands = {
            "t2i_bert": [
                "--cond",
                "caption=A frog.",
                "--guidance-scale",
                "3",
                "--num-samples",
                "4",
            ],
            "t2i_minilm": ["--prompt", "hamburger", "--guidance-scale", "3", "--num-samples", "4"],
            "scenes_semantic": ["--cond", f"segmentation={tmp / 'map.png'}"],
            "fmnist_sr4": ["--cond", f"lowres={tmp / 'small.png'}"],
            "fmnist_inpaint": [
                "--cond",
                f"image={tmp / 'item.png'}",
                "--cond",
                f"mask={tmp / 'mask.png'}",
            ],
        }
        for run, extra in commands.items():
            command = [ldmkit, "sample", "--checkpoint", str(args.runs / run / "pipeline"), *extra,
                       "--out", str(tmp / f"{run}.png"), "--no-progress"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            shown = " ".join(c if " " not in c else repr(c) for c in command[1:]).replace(
                str(tmp), "TMP"
            )
            results[run] = {
                "command": "ldmkit " + shown,
                "returncode": done.returncode,
                # success: what it wrote; failure: the error's last lines
                "output": (
                    (done.stdout if done.returncode == 0 else done.stderr)
                    .strip()
                    .replace(str(tmp), "TMP")
                    .splitlines()[-3:]
                ),
            }
    return results


def semantic_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """The segmenter's mIoU on the first stage's *reconstructions* of the real val scenes: what
    an LDM in that latent space could reach at best (samples decode through the same decoder)."""
    segmenter, summary = ce.scene_segmenter(args.scenes)
    num_classes = len(summary["classes"])
    if args.first_stage is None:  # the semantic LDM's own first stage
        first_stage = Pipeline.load(args.runs / args.semantic_run / "pipeline").eval().first_stage
        source = str(args.runs / args.semantic_run)
    else:  # a stage-1 run, measured before any LDM is trained on it
        from ldmkit.evaluation.autoencoder import load_first_stage
        from ldmkit.training.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(args.first_stage)
        first_stage, _ = load_first_stage(checkpoint, device=torch.device("cpu"))
        source = f"{checkpoint.path} (step {checkpoint.step})"
    result: dict[str, Any] = {"first_stage": source}
    for size, limit in ((32, args.n_scenes), (64, args.n_scenes_2x)):
        val = ce.load_split(args.scenes, "val", image_size=size, limit=limit)
        with torch.no_grad():
            rec = first_stage.decode(first_stage.encode(val["image"])).clamp(-1, 1)
        score = ce.miou(ce.segment(segmenter, rec), val["segmentation"], num_classes)
        real = ce.miou(ce.segment(segmenter, val["image"]), val["segmentation"], num_classes)
        result[f"{size // 32}x"] = {"maps": len(val["segmentation"]), "reconstructions": score,
                                    "real": real, "ratio": score["miou"] / real["miou"]}  # fmt: skip
    return result


TASKS = {"t2i": t2i, "semantic": semantic, "semantic_ceiling": semantic_ceiling, "sr": sr, "inpaint": inpaint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="t2i,semantic,sr,inpaint")
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--cutouts", default="data/cutouts")
    parser.add_argument("--scenes", default="data/semantic_scenes")
    parser.add_argument("--fmnist", default="data/fashion_mnist")
    parser.add_argument(
        "--per-class", type=int, default=7, help="t2i prompts per category and split"
    )
    parser.add_argument("--seeds", type=int, default=2, help="t2i samples per prompt")
    parser.add_argument(
        "--n", type=int, default=1000, help="Fashion-MNIST test images (sr, inpaint)"
    )
    parser.add_argument("--n-scenes", type=int, default=200, help="val maps at 1x")
    parser.add_argument("--n-scenes-2x", type=int, default=100, help="val maps at 2x")
    parser.add_argument("--t2i-models", default=",".join(DEFAULT_T2I_MODELS),
                        type=lambda value: [m.strip() for m in value.split(",") if m.strip()],
                        help="t2i: the text-to-image runs under --runs to measure (names start with t2i_)")
    parser.add_argument("--semantic-run", default="scenes_semantic",
                        help="semantic, semantic_ceiling: the LDM run under --runs")
    parser.add_argument("--first-stage", default=None,
                        help="semantic_ceiling: a stage-1 run dir to measure instead of the LDM's first stage")
    parser.add_argument("--chunk", type=int, default=100, help="samples per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine-known", type=int, default=50,
                        help="inpaint: also measure the samples with refine_known=STEPS (0: twice the same)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cli-check", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/conditioning_tasks.json"
    )
    parser.add_argument("--images", type=Path, default=ROOT / "docs/images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.images.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        print(f"== {task}", flush=True)
        key = task
        if task == "semantic_ceiling" and args.first_stage is not None:
            key = f"{task}[{Path(args.first_stage).name}]"
        elif task in ("semantic", "semantic_ceiling") and args.semantic_run != "scenes_semantic":
            key = f"{task}[{args.semantic_run}]"
        elif task == "t2i" and args.t2i_models != DEFAULT_T2I_MODELS:
            key = f"{task}[{','.join(args.t2i_models)}]"
        results[key] = TASKS[task](args)
        results[key]["command"] = "python benchmarks/conditioning_tasks.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[key], indent=2), flush=True)
    if args.cli_check:
        results["cli_check"] = cli_check(args)
        args.out.write_text(json.dumps(results, indent=2))
        print(json.dumps(results["cli_check"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
