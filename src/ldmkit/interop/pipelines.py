"""Whole pipelines from foreign checkpoints: what ``Pipeline.from_compvis`` and
``Pipeline.from_diffusers`` run.

Each reads the foreign files into an ldmkit config and a state dict (:mod:`.compvis`,
:mod:`.diffusers_format`), builds the pipeline that config describes with ``build`` (the
caller's ``Pipeline.from_config``: this layer never imports the Pipeline class) and loads the
translated weights into it, refusing any that do not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldmkit.errors import ConfigError
from ldmkit.interop import compvis

Build = Callable[[DictConfig], Any]


def from_compvis(
    build: Build,
    checkpoint: str | Path,
    config: str | Path | None = None,
    *,
    preset: str | None = None,
    use_ema: bool = True,
    null_class: str | int = "last",
    text_encoder: str | Path | None = None,
) -> Any:
    """The pipeline of the paper's ``.ckpt`` and its ``config.yaml`` (or a stored translation,
    ``preset``), with its weights (the EMA ones when ``use_ema`` and present); see
    ``Pipeline.from_compvis``."""
    model, state, facts = compvis.read_compvis(
        checkpoint, config, preset=preset, use_ema=use_ema, null_class=null_class, text_encoder=text_encoder
    )
    if model.kind != "pipeline":
        raise ConfigError(
            f"{model.source} describes a first stage ({model.groups['first_stage']['name']}), not a latent "
            "diffusion model: `ldmkit convert compvis` writes it as a folder for first_stage.checkpoint="
        )
    pipeline = build(compvis.compose(model, weights="ema" if facts.get("ema") else "raw"))
    compvis.check_schedule(facts, pipeline.schedule.alphas_cumprod, str(checkpoint))
    own = pipeline.state_dict()
    if "scale_factor" in own:  # the checkpoint's buffer (scale_by_std) or the YAML's value
        state["scale_factor"] = torch.full_like(own["scale_factor"], model.top["scale_factor"])
    compvis.load_converted(pipeline, state, str(checkpoint))
    return pipeline


def from_diffusers(build: Build, directory: str | Path, *, text_encoder_dir: str | Path | None = None) -> Any:
    """The pipeline of a diffusers folder, with its weights; see ``Pipeline.from_diffusers``."""
    from ldmkit.interop import diffusers_format

    cfg, state, scale = diffusers_format.read_diffusers(directory, text_encoder_dir=text_encoder_dir)
    pipeline = build(cfg)
    state = diffusers_format.fit_state(state, pipeline.state_dict(), scale)
    compvis.load_converted(pipeline, state, str(directory))
    return pipeline
