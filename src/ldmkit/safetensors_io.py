"""The one reader of ``.safetensors`` files.

Pipeline folders, training checkpoints and a component's ``checkpoint:`` weights are all read
through :func:`read_safetensors`, so an unreadable file raises the same
:class:`~ldmkit.errors.UnreadableWeightsError` naming it, wherever it was opened. (Writing
stays with the writers: :meth:`ldmkit.pipeline.Pipeline.save`, the training checkpoints.)

The header (names, shapes, offsets) is read and checked against the file first; a tensor's
bytes are read only when it is asked for, so a caller checks names and shapes
(:func:`read_safetensors_shapes`) before reading anything, and reads only what it uses.
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
    prefix: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """The tensors of the file ``path`` on ``device``: all of them, only ``keys``, or only
    those whose names start with ``prefix`` (``keys=()`` reads nothing but the header: a check
    that the file parses).

    Raises :class:`~ldmkit.errors.UnreadableWeightsError` naming the file when it is missing,
    does not parse, or lacks one of ``keys``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            stored = list(handle.keys())
            wanted = stored if keys is None else list(keys)
            if prefix is not None:
                wanted = [key for key in wanted if key.startswith(prefix)]
            absent = sorted(set(wanted) - set(stored))
            tensors = {} if absent else {key: handle.get_tensor(key) for key in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UnreadableWeightsError(path, _reason(path, err)) from err
    if absent:
        raise UnreadableWeightsError(
            path, f"it has no tensor named {', '.join(map(repr, absent[:5]))}"
        )
    return tensors


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the header of ``path`` alone (no tensor is read);
    :class:`~ldmkit.errors.UnreadableWeightsError` naming the file when it does not parse."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UnreadableWeightsError(path, _reason(path, err)) from err


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in the header of ``path`` (empty when there is none);
    :class:`~ldmkit.errors.UnreadableWeightsError` naming the file when it does not parse."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UnreadableWeightsError(path, _reason(path, err)) from err


def _reason(path: str | os.PathLike, err: BaseException) -> str:
    """``err`` in one line; safetensors' words for data that does not end where the file
    does (``incomplete metadata, file not fully covered``) said plainly."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines) or type(err).__name__
    if "file not fully covered" in text:
        try:
            size = f" ({os.path.getsize(path)} bytes)"
        except OSError:
            size = ""
        return (
            f"the tensor offsets in its header do not match the file's size{size}: the file is "
            "cut short, has bytes appended, or its header is crafted"
        )
    return text
