"""Errors raised by ldmkit.data; each message names the culprit (source, file, shard, key)."""

from __future__ import annotations

from ldmkit.errors import LdmkitError


class DataError(LdmkitError, RuntimeError):
    """Data cannot be used: no valid sample, a broken manifest, bad options."""


class SourceNotFoundError(DataError, FileNotFoundError):
    """A dataset source is not installed or not where it was expected.

    The message says what to install or where to put the files.
    """


class ShardShareWarning(UserWarning):
    """Some of the data's readers (ranks x workers) get no shard. Every rank computes the same
    numbers, so ``ldmkit train`` prints it once, on rank 0, in one line."""

    same_on_every_rank = True
