"""What training raises and warns: the engine, its state and its data share these."""

from __future__ import annotations

from ldmkit.errors import LdmkitError


class TrainingError(LdmkitError, RuntimeError):
    """Training cannot start or continue (the run folder is left as it was)."""


class TrainingDivergedError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is untouched."""


class TrainingWarning(UserWarning):
    """Something about a run the user should know (changed settings on resume, an inexact data
    position, options the stage does not read, no validation split, an untrained first stage);
    ``ldmkit train`` prints each in one line."""
