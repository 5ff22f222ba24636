"""``evaluate stage=ldm``: sample quality of a trained latent diffusion model on a held-out
split — the Fréchet distance between the feature statistics of the split's images and of
samples drawn for the same conditions (FID in the paper's Tab. 1-3 and 6-7 where the
features are Inception's), KID, and, where the conditioner reads a class label and the
features are the Fashion-MNIST classifier's, the share of samples that classifier puts in
the class they were drawn for.

Each of the split's batches gives its conditions (the conditioner's ``input_keys``, with the
inputs training adds, such as inpainting masks) to one sampling call of the same size; an
unconditional model draws as many samples as the batch has images. The model is a pipeline
folder: ``eval.checkpoint`` (a run folder means its ``pipeline/``), default ``run_dir``.
Sampling runs the config's ``sampler`` (``sampler.steps=50`` on the command line), with
``eval.steps`` and ``eval.guidance_scale`` where given, from ``eval.seed`` (default ``seed``):
the same command scores the same numbers.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ldmkit.errors import ConfigError
from ldmkit.evaluation.autoencoder import (
    _feature_model,
    eval_options,
    eval_split,
    finish_report,
    report_path,
)
from ldmkit.evaluation.frechet import FeaturePair

__all__ = ["evaluate_ldm", "pipeline_folder", "sample_metrics"]


def pipeline_folder(path: str | Path) -> Path:
    """The pipeline folder ``path`` names: itself, or a training run's ``pipeline/``."""
    path = Path(path).expanduser()
    exported = path / "pipeline"  # a run folder's own config.yaml is the run's
    if (exported / "config.yaml").is_file() and (not (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        return exported
    return path


def _pair(size: Any) -> list[int] | None:
    if size is None:
        return None
    return [int(size), int(size)] if isinstance(size, int) else [int(v) for v in size]


def _class_names(pipeline: Any, cfg: Any) -> list[str] | None:
    """The names of the classes the conditioner's labels stand for: its own ``class_names``,
    else those of the prepared data ``cfg`` names (None where neither says)."""
    names = getattr(pipeline.conditioner, "class_names", None)
    if names is None and cfg is not None:
        from ldmkit.data.loader import data_config, load_manifest

        try:
            names = load_manifest(data_config(cfg.data))[1].facts()["class_names"] or None
        except Exception:  # noqa: BLE001 - no manifest to read names from: not judged
            names = None
    return [str(n) for n in names] if names is not None else None


def _trained_step(folder: Path) -> int | None:
    """The step of the run's newest checkpoint, which ``pipeline/`` was exported at."""
    from ldmkit.checkpoint_layout import usable_checkpoints

    checkpoints = folder.parent / "checkpoints"
    if folder.name != "pipeline" or not checkpoints.is_dir():
        return None
    latest = next(usable_checkpoints(checkpoints), None)
    return latest.step if latest is not None else None


@torch.no_grad()
def sample_metrics(
    pipeline: Any,
    batches: Any,
    *,
    device: torch.device,
    feature_model: torch.nn.Module | None,
    max_images: int | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    judge_classes: bool = True,
) -> dict[str, Any]:
    """Samples for the conditions of each batch of ``batches``, scored against the batch's
    images: ``frechet_distance`` and ``kid`` (``feature_model``'s features), and
    ``class_accuracy`` where the conditioner reads a class key, ``feature_model`` is the
    Fashion-MNIST classifier's (its logits judge each sample) and ``judge_classes`` says the
    labels are Fashion-MNIST's classes. Batch ``i``'s samples are drawn from seed
    ``seed + <images before it>``."""
    from tqdm.auto import tqdm

    from ldmkit.sampling_request import SEED_LIMIT
    from ldmkit.training.batches import batch_images

    conditioner = pipeline.conditioner
    class_keys = [k for k in conditioner.input_keys if conditioner.input_kind(k) == "class"]
    classifier = getattr(feature_model, "model", None) if getattr(feature_model, "name", "") == "fashion_mnist" else None
    judged_key = class_keys[0] if judge_classes and classifier is not None and len(class_keys) == 1 else None
    gen = torch.Generator().manual_seed(seed)  # for the inputs training adds (random masks)
    features = FeaturePair()
    correct = judged = seen = 0
    size = None
    bar = tqdm(total=max_images, disable=not progress, desc="ldm samples", unit="img")
    try:
        for batch in batches:
            real = batch_images(batch, channels=int(pipeline.first_stage.image_channels), device=device)
            n = real.shape[0] if max_images is None else min(real.shape[0], max_images - seen)
            size = size or list(real.shape[-2:])
            real = real[:n]
            cond = None
            if conditioner.input_keys:
                inputs = conditioner.training_inputs(batch, gen)
                missing = [k for k in conditioner.input_keys if k not in inputs]
                if missing:
                    raise ConfigError(
                        f"the conditioner ({type(conditioner).__name__}) reads {missing}, which the "
                        f"evaluation split's batches lack (their keys: {sorted(batch)})"
                    )
                cond = {k: inputs[k][:n] for k in conditioner.input_keys}
            fake = pipeline.sample(
                cond, num_samples=None if cond else n, steps=steps, guidance_scale=guidance_scale,
                seed=(seed + seen) % SEED_LIMIT, size=tuple(real.shape[-2:]),
            ).to(device)  # fmt: skip
            if feature_model is not None:
                features.update(feature_model(real), feature_model(fake))
            if judged_key is not None:
                labels = torch.as_tensor(cond[judged_key]).to(device).long().flatten()
                correct += int((classifier(fake).argmax(1) == labels).sum())
                judged += n
            seen += n
            bar.update(n)
            if max_images is not None and seen >= max_images:
                break
    finally:
        bar.close()
    if seen == 0:
        raise ConfigError("the evaluation split yielded no images")
    results: dict[str, Any] = {"num_images": seen, "image_size": size}
    results.update(features.scores())
    results["class_accuracy"] = correct / judged if judged else None
    if judged:
        results["class_accuracy_key"] = judged_key
    return results


def evaluate_ldm(cfg: Any, *, data: Any = None, pipeline: Any = None, write: bool = True) -> dict[str, Any]:
    """Score a trained latent diffusion model's samples on ``eval.split`` and write the JSON
    report (``<run>/eval/ldm_<split>_step_<N>.json``, or ``eval.output``).

    ``pipeline`` evaluates a :class:`~ldmkit.Pipeline` object instead of a folder;
    ``data(split, epoch)`` replaces the configured dataset (tests)."""
    from omegaconf import OmegaConf

    from ldmkit.devices import resolve_device

    options = eval_options(cfg)
    device = resolve_device(options["device"], "eval.device")
    started = time.perf_counter()
    report: dict[str, Any] = {"stage": "ldm"}
    folder = step = None
    if pipeline is None:
        from ldmkit.pipeline import Pipeline, not_a_pipeline_folder

        given = options["checkpoint"] or cfg.get("run_dir")
        if given is None:
            raise ConfigError("evaluate stage=ldm needs a model: set eval.checkpoint (a pipeline or run folder) or run_dir")
        folder = pipeline_folder(given)
        if not (folder / "config.yaml").is_file() and not folder.is_file():
            where = "eval.checkpoint" if options["checkpoint"] else "run_dir"
            raise FileNotFoundError(
                f"no trained pipeline at {folder} ({where}; checkpoint file missing: {folder / 'config.yaml'}): "
                "give the run folder of an ldm training run, or a pipeline folder, as run_dir=... or eval.checkpoint=..."
                + not_a_pipeline_folder(folder)
            )
        pipeline = Pipeline.load(folder, device=device)
        if cfg.get("sampler") is not None:  # the command line's (default ddim), not the one saved
            pipeline.with_sampler(cfg.sampler)
        step = _trained_step(folder)
        report.update(checkpoint=str(folder), step=step)
    else:
        pipeline = pipeline.to(device)
    split = eval_split(cfg, options, data, pipeline.config)
    output = None
    if write:
        if folder is None:
            base = Path(cfg.get("run_dir") or ".").expanduser()
        else:  # a run's pipeline/ reports into the run's eval/; a pipeline folder of its own, into its own
            base = folder.parent if folder.name == "pipeline" and (folder.parent / "checkpoints").is_dir() else folder
        output = report_path(options, base / "eval" / f"ldm_{split}_step_{step if step is not None else 'model'}.json")
    if data is not None:
        batches = data(split, 0)
    else:
        from ldmkit.data import build_dataloader

        batches = build_dataloader(cfg.data, batch_size=int(options["batch_size"]), split=split,
                                   num_workers=int(options["num_workers"]), seed=int(cfg.get("seed", 0)))  # fmt: skip
    feature_model, feature_note = _feature_model(options, device)
    seed = int(options["seed"] if options["seed"] is not None else cfg.get("seed", 0))
    from ldmkit.data.sources.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES

    names = _class_names(pipeline, cfg if data is None else None)
    fashion = names is not None and names == FASHION_MNIST_CLASSES
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics = sample_metrics(
            pipeline, batches, device=device, feature_model=feature_model, max_images=options["max_images"],
            steps=options["steps"], guidance_scale=float(options["guidance_scale"]), seed=seed,
            progress=bool(options.get("progress", True)), judge_classes=fashion,
        )  # fmt: skip
    sampler = pipeline.config.sampler if pipeline.config is not None else None
    report.update(split=split, **metrics)
    report["sampler"] = OmegaConf.to_container(sampler, resolve=True) if sampler is not None else None
    report["steps"] = getattr(pipeline.sampler, "steps", None) if options["steps"] is None else int(options["steps"])
    if isinstance(report["sampler"], dict):
        report["sampler"]["steps"] = report["steps"]  # what ran (eval.steps over sampler.steps)
    report["data"] = "data(split, epoch)" if data is not None else OmegaConf.select(cfg, "data.path", default=None)
    trained = _pair(pipeline.image_size)
    if trained is not None and metrics["image_size"] is not None and trained != metrics["image_size"]:
        report["note"] = (f"the split's images are {metrics['image_size'][0]}x{metrics['image_size'][1]}, the model "
                          f"was trained at {trained[0]}x{trained[1]} (image_size): its samples are drawn at the split's size")
        warnings.warn(report["note"], stacklevel=2)
    report["guidance_scale"] = float(options["guidance_scale"])
    report["seed"] = seed
    notes = {}
    if metrics["class_accuracy"] is None:
        if not any(pipeline.conditioner.input_kind(k) == "class" for k in pipeline.conditioner.input_keys):
            notes["class_accuracy"] = "the conditioner reads no class label"
        elif not fashion:
            notes["class_accuracy"] = ("the Fashion-MNIST classifier judges Fashion-MNIST's classes only (the class names "
                                       "of the conditioner or of the data are not those)")
        else:
            notes["class_accuracy"] = "judged by the Fashion-MNIST classifier's features only (eval.fid_features=fashion_mnist)"
    if metrics["frechet_distance"] is None and feature_model is not None:
        notes["frechet_distance"] = notes["kid"] = f"a Frechet distance needs at least 2 images, {metrics['num_images']} scored"
    if pipeline.conditioner.input_keys == () and float(options["guidance_scale"]) != 1:
        notes["guidance_scale"] = "an unconditional model has no condition to guide by: sampled without guidance"
    return finish_report(report, notes, feature_model, feature_note, started, output if write else None)
