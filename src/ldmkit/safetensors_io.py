"""The one reader of ``.safetensors`` files.

Pipeline folders, training checkpoints and a component's ``checkpoint:`` weights are all read
through :func:`read_safetensors`, so an unreadable file raises the same
:class:`~ldmkit.errors.UnreadableWeightsError` naming it, wherever it was opened. (Writing
stays with the writers: :meth:`ldmkit.pipeline.Pipeline.save`, the training checkpoints.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor

from ldmkit.errors import UnreadableWeightsError


def read_safetensors(
    path: str | os.PathLike,
    *,
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """The tensors of the file ``path`` on ``device``: all of them, or only ``keys``
    (``keys=()`` reads nothing but the header: a check that the file parses).

    Raises :class:`~ldmkit.errors.UnreadableWeightsError` naming the file when it is missing,
    does not parse, or lacks one of ``keys``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            stored = list(handle.keys())
            wanted = stored if keys is None else list(keys)
            absent = sorted(set(wanted) - set(stored))
            tensors = {} if absent else {key: handle.get_tensor(key) for key in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UnreadableWeightsError(path, _one_line(err)) from err
    if absent:
        raise UnreadableWeightsError(
            path, f"it has no tensor named {', '.join(map(repr, absent[:5]))}"
        )
    return tensors


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in the header of ``path`` (empty when there is none);
    :class:`~ldmkit.errors.UnreadableWeightsError` naming the file when it does not parse."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UnreadableWeightsError(path, _one_line(err)) from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__
