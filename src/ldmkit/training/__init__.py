"""The training engine: ``train(cfg)`` runs the stage ``cfg.stage`` names in ``cfg.run_dir``,
resuming from the newest valid checkpoint there. Stages are plugins
(``ldmkit_register_stages``; ldmkit's own are in :mod:`ldmkit.training.stages`). See
docs/training.md.

Owns the training loop (``engine``), the run's state and checkpoints (``state``), its
batches (``data``), the ranks under torchrun (``distributed``) and the two stages. May import
every layer below it (``pipeline``, ``assembly``, ``data``, ``losses``, ...) but not
``evaluation``, which registers its evaluators with the stages; only ``evaluation`` and the
entry points import it, and its two stages do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.registry import Stage
from ldmkit.training.data import DataFactory
from ldmkit.training.distributed import distributed_info, distributed_process_group
from ldmkit.training.engine import Trainer, resolve_device
from ldmkit.training.errors import TrainingDivergedError, TrainingError, TrainingWarning
from ldmkit.training.init_from import adopt_source_architecture, compose_training_config
from ldmkit.training.signals import EXIT_PREEMPTED, TrainingInterrupted
from ldmkit.training.state import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    TrainingState,
    resolve_checkpoint,
)

__all__ = [
    "EXIT_PREEMPTED",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "DataFactory",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingState",
    "TrainingWarning",
    "compose_training_config",
    "distributed_info",
    "distributed_process_group",
    "get_stage",
    "resolve_checkpoint",
    "resolve_device",
    "train",
]


def get_stage(name: Any) -> Stage:
    """The registered training stage ``name``; an unknown one is a :class:`ConfigError` that
    lists the registered stages and the plugin providing each."""
    from ldmkit.config import ConfigError
    from ldmkit.plugins import get_registry
    from ldmkit.registry import RegistryError

    registry = get_registry()
    if not isinstance(name, str):
        listing = registry.listing("stage")
        raise ConfigError(f"stage must be the name of a registered stage, got {name!r}; {listing}")
    try:
        return registry.stage(name)
    except RegistryError as err:
        raise ConfigError(str(err)) from None


def train(cfg: Any, *, data: DataFactory | None = None) -> Path:
    """Train the stage ``cfg.stage`` (ldmkit's own: ``autoencoder``, the first stage; ``ldm``,
    the latent diffusion model; plugins add more) and return the run folder.
    ``data(split, epoch)`` may replace the configured dataset (tests, notebooks). Under
    ``torchrun`` (WORLD_SIZE > 1) the process group is set up here (gloo on CPU, nccl on CUDA)
    and torn down afterwards. With ``trainer.init_architecture=source`` the model is
    ``trainer.init_from``'s, as ``ldmkit train`` trains it; keys set inside its groups
    (``conditioner.num_classes=12``) need the config of :func:`compose_training_config`."""
    from omegaconf import DictConfig

    from ldmkit.config import check_config

    chosen = get_stage(cfg.get("stage"))
    if isinstance(cfg, DictConfig):
        cfg = adopt_source_architecture(cfg)  # as it is unless asked for, or taken already
        check_config(cfg)  # composed configs were checked already; hand-made ones too
    with distributed_process_group():
        return chosen.train(cfg, data=data)
