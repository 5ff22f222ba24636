"""The training engine: ``train(cfg)`` runs the stage ``cfg.stage`` names in ``cfg.run_dir``,
resuming from the newest valid checkpoint there. See docs/training.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    resolve_checkpoint,
)
from ldmkit.training.engine import (
    DataFactory,
    Trainer,
    TrainingDivergedError,
    TrainingError,
    resolve_device,
)

STAGES = ("autoencoder", "ldm")

__all__ = [
    "STAGES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "DataFactory",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "resolve_checkpoint",
    "resolve_device",
    "train",
]


def train(cfg: Any, *, data: DataFactory | None = None) -> Path:
    """Train the stage ``cfg.stage`` (``autoencoder``: the first stage) and return the run
    folder. ``data(split, epoch)`` may replace the configured dataset (tests, notebooks)."""
    stage = cfg.get("stage")
    if stage == "autoencoder":
        from ldmkit.training.autoencoder import train_autoencoder

        return train_autoencoder(cfg, data=data)
    if stage == "ldm":
        raise NotImplementedError(
            "stage=ldm (latent diffusion training) is not implemented yet; "
            "stage=autoencoder trains the first stage"
        )
    from ldmkit.config import ConfigError

    raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
