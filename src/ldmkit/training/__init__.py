"""The training engine: ``train(cfg)`` runs the stage ``cfg.stage`` names in ``cfg.run_dir``,
resuming from the newest valid checkpoint there. See docs/training.md."""

from __future__ import annotations

import contextlib
import os
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
    TrainingWarning,
    distributed_info,
    resolve_device,
)
from ldmkit.training.signals import EXIT_PREEMPTED, TrainingInterrupted

STAGES = ("autoencoder", "ldm")

__all__ = [
    "EXIT_PREEMPTED",
    "STAGES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "DataFactory",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingWarning",
    "resolve_checkpoint",
    "resolve_device",
    "train",
]


def train(cfg: Any, *, data: DataFactory | None = None) -> Path:
    """Train the stage ``cfg.stage`` (``autoencoder``: the first stage, ``ldm``: the latent
    diffusion model) and return the run folder. ``data(split, epoch)`` may replace the
    configured dataset (tests, notebooks). Under ``torchrun`` (WORLD_SIZE > 1) the process
    group is set up here (gloo on CPU, nccl on CUDA) and torn down afterwards."""
    from omegaconf import DictConfig

    from ldmkit.config import ConfigError, check_config

    stage = cfg.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if isinstance(cfg, DictConfig):
        check_config(cfg)  # composed configs were checked already; hand-made ones too
    with distributed_process_group():
        if stage == "autoencoder":
            from ldmkit.training.autoencoder import train_autoencoder

            if distributed_info()[1] > 1:
                raise TrainingError(
                    "stage=autoencoder does not run distributed yet; start it without torchrun"
                )
            return train_autoencoder(cfg, data=data)
        from ldmkit.training.ldm import train_ldm

        return train_ldm(cfg, data=data)


@contextlib.contextmanager
def distributed_process_group():
    """Initialize torch.distributed from torchrun's environment, if it asks for it (any
    ``torchrun`` launch, one process included: NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not wanted or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
