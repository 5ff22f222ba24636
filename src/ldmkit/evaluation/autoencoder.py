"""``evaluate stage=autoencoder``: reconstruction quality of a trained first stage on the
test split — PSNR and SSIM, LPIPS (when the VGG weights exist) and a Fréchet distance
between the feature statistics of inputs and reconstructions (rFID in the paper's Tab. 8).

Options live under ``eval`` in the config (defaults in :data:`EVAL_DEFAULTS`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldmkit.errors import ConfigError
from ldmkit.evaluation.frechet import FeaturePair
from ldmkit.evaluation.metrics import psnr, ssim
from ldmkit.io import atomic_write_text, check_writable

EVAL_DEFAULTS: dict[str, Any] = {
    "checkpoint": None,  # a checkpoint folder or a run folder (default: cfg.run_dir's latest)
    "split": "auto",  # auto: the data's held-out split (val, else test), as trainer.val_split
    "batch_size": 100,
    "max_images": None,  # null: the whole split
    "lpips": "auto",  # auto (when the VGG weights exist) | true | false
    "fid_features": "auto",  # auto | inception | fashion_mnist | none
    "feature_checkpoint": None,  # the Fashion-MNIST classifier (default: $LDMKIT_CACHE/...)
    "output": None,  # JSON path (default: <run>/eval/autoencoder_<split>_step_<N>.json)
    "device": "auto",
    "num_workers": 0,
    # stage=ldm (ldmkit.evaluation.ldm): how the samples are drawn
    "steps": None,  # null: the sampler's own (sampler.steps)
    "guidance_scale": 1.0,  # classifier-free guidance (1: none)
    "seed": None,  # null: the config's seed
    "progress": True,
}


def eval_options(cfg: Any) -> dict[str, Any]:
    options = dict(EVAL_DEFAULTS)
    node = cfg.get("eval") if cfg is not None else None
    if node is not None:
        options.update(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node))
    unknown = sorted(set(options) - set(EVAL_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown eval option(s) {unknown}; known: {', '.join(sorted(EVAL_DEFAULTS))}")
    return options


def load_first_stage(checkpoint: Any, *, device: torch.device) -> tuple[torch.nn.Module, DictConfig]:
    """Rebuild the first stage a stage-1 checkpoint was trained with (from the config saved
    beside its weights; names resolve through the registry) and load its weights."""
    from ldmkit.config import load_saved_config
    from ldmkit.training.autoencoder import build_first_stage
    from ldmkit.training.checkpoint import CheckpointError, read_safetensors, unflatten_state

    if not checkpoint.config_file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint.path} has no config.yaml to rebuild its first stage from")
    saved = load_saved_config(checkpoint.config_file)
    model = build_first_stage(saved)
    tensors = unflatten_state(read_safetensors(checkpoint.model_file, prefix="first_stage."), "first_stage")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint.model_file} does not fit its own config: {err}") from err
    return model.to(device).eval(), saved


def _lpips_model(choice: Any, device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    from ldmkit.losses.perceptual import LPIPS, MissingWeightsError, require_vgg16_weights

    if choice in (False, "false", "none"):
        return None, "disabled (eval.lpips=false)"
    try:
        require_vgg16_weights("LPIPS", hint="evaluate without it (eval.lpips=false)")
        return LPIPS().to(device), None
    except MissingWeightsError as err:
        if choice in (True, "true"):
            raise
        return None, str(err)


def _feature_model(options: Mapping[str, Any], device: torch.device) -> tuple[torch.nn.Module | None, str]:
    from ldmkit.evaluation.features import auto_feature_extractor, build_feature_extractor

    choice = options["fid_features"]
    if choice in (None, "none", False):
        return None, "disabled (eval.fid_features=none)"
    if choice == "auto":
        model, name_or_reason = auto_feature_extractor(options["feature_checkpoint"])
        return (model.to(device), name_or_reason) if model is not None else (None, name_or_reason)
    model = build_feature_extractor(choice, weights=options["feature_checkpoint"] if choice == "fashion_mnist" else None)
    return model.to(device), choice


@torch.no_grad()
def reconstruction_metrics(
    first_stage: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    lpips_model: torch.nn.Module | None = None,
    feature_model: torch.nn.Module | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Average per-image PSNR / SSIM / LPIPS of ``decode(encode(x))`` against ``x`` (in
    [0, 1]), and the Fréchet distance and KID (mean and std over subsets) between the
    features of ``x`` and of the reconstructions when ``feature_model`` is given. Images
    smaller than SSIM's window score ``ssim: None``, the reason under ``skipped``."""
    from ldmkit.training.autoencoder import batch_images, to_unit

    psnrs, ssims, lpipses = [], [], []
    window = 11  # SSIM's Gaussian window (metrics.ssim): smaller images have no SSIM
    ssim_note = None
    features = FeaturePair()
    seen = 0
    for batch in batches:
        x = batch_images(batch, channels=first_stage.image_channels, device=device)
        if max_images is not None:
            x = x[: max_images - seen]
        rec = first_stage.decode(first_stage.encode(x)).clamp(-1, 1)
        psnrs.append(psnr(to_unit(rec), to_unit(x)).cpu())
        if min(x.shape[-2:]) < window:
            ssim_note = f"SSIM's {window}x{window} window does not fit the {x.shape[-2]}x{x.shape[-1]} images"
        else:
            ssims.append(ssim(to_unit(rec), to_unit(x), window_size=window).cpu())
        if lpips_model is not None:
            lpipses.append(lpips_model(x, rec).flatten().cpu())
        if feature_model is not None:
            features.update(feature_model(x), feature_model(rec))
        seen += x.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if seen == 0:
        raise ConfigError("the evaluation split yielded no images")
    psnr_all = torch.cat(psnrs)
    ssim_all = torch.cat(ssims) if ssims and ssim_note is None else None
    results: dict[str, Any] = {
        "num_images": seen,
        "psnr": float(psnr_all.mean()),
        "psnr_std": float(psnr_all.std()) if seen > 1 else 0.0,
        "ssim": float(ssim_all.mean()) if ssim_all is not None else None,
        "ssim_std": (float(ssim_all.std()) if seen > 1 else 0.0) if ssim_all is not None else None,
        "lpips": float(torch.cat(lpipses).mean()) if lpipses else None,
    }
    if ssim_note is not None:
        results["skipped"] = {"ssim": ssim_note}
    results.update(features.scores())
    return results


def evaluate_autoencoder(
    cfg: Any,
    *,
    data: Any = None,
    first_stage: torch.nn.Module | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score a trained first stage on ``eval.split`` and write the JSON report.

    ``first_stage`` evaluates a model object instead of a checkpoint; ``data(split, epoch)``
    replaces the configured dataset (tests).
    """
    from ldmkit.devices import resolve_device
    from ldmkit.training.checkpoint import resolve_checkpoint

    options = eval_options(cfg)
    device = resolve_device(options["device"], "eval.device")
    started = time.perf_counter()
    checkpoint = None
    report: dict[str, Any] = {"stage": "autoencoder"}
    if first_stage is None:
        checkpoint = resolve_checkpoint(options["checkpoint"] or cfg.get("run_dir"))
        first_stage, saved = load_first_stage(checkpoint, device=device)
        if data is None:  # a size f does not divide fails now, in one line, not in the encoder
            from ldmkit.training.engine import check_image_sizes

            check_image_sizes(cfg, int(first_stage.downsample_factor), f"the first stage of {checkpoint.path}")
        report.update(checkpoint=str(checkpoint.path), step=checkpoint.step,
                      first_stage=OmegaConf.to_container(saved.first_stage, resolve=True))
        if saved.get("stage", "autoencoder") != "autoencoder":  # said, not scored silently
            report["note"] = (f"{checkpoint.path} is a {saved.get('stage')} run: this scores its first stage "
                              f"(trained in {saved.first_stage.get('checkpoint') or 'that run'}), not its samples")
    else:
        first_stage = first_stage.to(device).eval()
    split = eval_split(cfg, options, data, saved if checkpoint is not None else None)
    output = None
    if write:
        base = checkpoint.path.parent.parent if checkpoint is not None else Path(cfg.get("run_dir") or ".").expanduser()
        step = checkpoint.step if checkpoint is not None else "model"
        output = report_path(options, base / "eval" / f"autoencoder_{split}_step_{step}.json")
    if data is not None:
        batches = data(split, 0)
    else:
        from ldmkit.data import build_dataloader
        from ldmkit.data.errors import SourceNotFoundError

        try:
            batches = build_dataloader(cfg.data, batch_size=int(options["batch_size"]), split=split,
                                       num_workers=int(options["num_workers"]), seed=int(cfg.get("seed", 0)))
        except SourceNotFoundError as err:
            raise _missing_data(err, cfg, saved if checkpoint is not None else None) from None
    lpips_model, lpips_note = _lpips_model(options["lpips"], device)
    feature_model, feature_note = _feature_model(options, device)
    # an encoder that samples (KL with encode_mode=sample) draws from the run's seed: the same
    # command scores the same numbers, and the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(cfg.get("seed", 0)))
        metrics = reconstruction_metrics(
            first_stage, batches, device=device, lpips_model=lpips_model,
            feature_model=feature_model, max_images=options["max_images"],
        )
    report.update(split=split, **metrics)
    notes = report.pop("skipped", {})
    if lpips_model is None:
        notes["lpips"] = lpips_note
    if metrics["frechet_distance"] is None and feature_model is not None:
        notes["frechet_distance"] = notes["kid"] = f"a Frechet distance needs at least 2 images, {metrics['num_images']} scored"
    return finish_report(report, notes, feature_model, feature_note, started, output if write else None)


def report_path(options: Mapping[str, Any], default: Path) -> Path:
    """Where the report goes: ``eval.output`` (a ``.json`` file that is not there yet, or an
    earlier report), else ``default``; checked to be writable now, not after the evaluation."""
    output = Path(options["output"]).expanduser() if options["output"] is not None else default
    check_writable(output)
    if options["output"] is not None:
        if output.suffix.lower() != ".json":
            raise ConfigError(f"eval.output={output}: the report is JSON: name a .json file")
        if output.is_file() and not _is_report(output):  # a model's config.yaml, say
            raise ConfigError(f"eval.output={output} exists and is not an evaluation report: name another file")
    return output


def _is_report(path: Path) -> bool:
    try:
        return "stage" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return False


def finish_report(report: dict[str, Any], notes: dict[str, Any], feature_model: Any, feature_note: str,
                  started: float, output: Path | None) -> dict[str, Any]:
    """An evaluator's last lines: the feature network (or why there is none) and what was
    skipped, the time taken; written atomically to ``output`` (None: not written)."""
    report["frechet_features"] = feature_note if feature_model is not None else None
    if feature_model is None:
        notes["frechet_distance"] = notes["kid"] = feature_note
    if notes:
        report["skipped"] = notes
    report["seconds"] = time.perf_counter() - started
    if output is not None:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
        report["output"] = str(output)
    return report


def eval_split(cfg: Any, options: Mapping[str, Any], data: Any, saved: Any) -> str:
    """The split ``eval.split`` names: ``auto`` is the prepared data's held-out split (``test``
    for a ``data(split, epoch)`` factory, which has no manifest). ``saved``: the config of the
    run being scored (None without one), to say which data it was trained on."""
    requested = options["split"]
    split = requested
    if requested == "auto":
        if data is not None:
            split = "test"
        else:
            from ldmkit.data.errors import SourceNotFoundError
            from ldmkit.data.loader import data_config, load_manifest

            try:
                split = load_manifest(data_config(cfg.data))[1].facts()["val_split"]
            except SourceNotFoundError as err:
                raise _missing_data(err, cfg, saved) from None
    if split is None:  # ${manifest:val_split} of data prepared without a held-out split
        raise ConfigError(
            f"eval.split is {requested or 'null'}: the data has no held-out split (val or test); prepare it with "
            "val_fraction=0.05 (ldmkit data prepare ... val_fraction=0.05 overwrite=true) or set eval.split=train"
        )
    return str(split)


def _missing_data(err: Exception, cfg: Any, saved: Any) -> Exception:
    """``err`` (no prepared dataset), saying which data the run was trained on when the
    command line names other data (``saved``: the run's config, None without a run)."""
    from ldmkit.data.errors import SourceNotFoundError

    trained_on = _other_data(cfg, saved) if saved is not None else None
    if trained_on is None:
        return err
    return SourceNotFoundError(
        f"{err}; the run was trained on {trained_on}: evaluate reads the data its command "
        f"line gives, so repeat the run's data overrides (or its experiment=)"
    )


def _other_data(cfg: Any, saved: DictConfig) -> str | None:
    """``data=NAME data.path=PATH`` of the data a run was trained on, where it is not the data
    ``cfg`` names (None where they agree)."""
    def described(config: Any) -> list[str]:
        choice = (config.get("choices") or {}).get("data")
        path = OmegaConf.select(config, "data.path", default=None)
        return [f"data={choice}"] * bool(choice) + [f"data.path={path}"] * bool(path)

    trained, given = described(saved), described(cfg)
    return " ".join(trained) if trained and trained != given else None
