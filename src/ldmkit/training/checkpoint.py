"""Crash-safe training checkpoints: the checkpoint folder, its writer
(:class:`CheckpointManager`) and reader. They live in :mod:`ldmkit.training.state` with the
training state they keep; this module re-exports them where the trainer's callers have always
found them.
"""

from __future__ import annotations

from ldmkit.training.state import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAINING_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    flatten_state,
    load_state,
    read_safetensors,
    resolve_checkpoint,
    skip_warning,
    unflatten_state,
    validate,
)

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "TRAINING_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointWarning",
    "flatten_state",
    "load_state",
    "read_safetensors",
    "resolve_checkpoint",
    "skip_warning",
    "unflatten_state",
    "validate",
]
