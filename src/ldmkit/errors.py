"""The base class of ldmkit's user-facing errors, and the errors that more than one layer
raises (weights and checkpoints are read by the core and by the trainer)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" for none): a long error (a compiler's, a
    loader's) quoted inside a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def first_few(items: Sequence[str], *, most: int = 3, sep: str = ", ") -> str:
    """``a, b, c (and 4 more)``: the first ``most`` of ``items`` for a one-line message."""
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more


class LdmkitError(Exception):
    """An error whose message names the culprit (config, file, plugin, key) and what to do.

    The CLI prints these in one line without a traceback; every specific error also
    derives from the matching built-in (ValueError, LookupError, RuntimeError, ...).
    """


class WeightsError(LdmkitError, ValueError):
    """Weights are missing, unreadable or do not fit the component they are loaded into."""


class CheckpointError(LdmkitError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


class UnreadableWeightsError(WeightsError, CheckpointError):
    """A weights file that cannot be read: not there, truncated, not safetensors, a pickle
    that is not weights-only, or without a tensor asked for. ``path`` is the file.

    Every reader of weights raises this one type, so a caller that handles bad weights
    (``except WeightsError``, composition) and one that handles a bad checkpoint
    (``except CheckpointError``, the trainer's resume) both catch it.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read checkpoint weights {path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class ConfigError(LdmkitError, ValueError):
    """A config does not compose, names something unknown, or its parts do not fit
    (``ldmkit.config`` raises it; defined here so that foundation modules can too)."""
