"""The layout of a training checkpoint on disk, and finding the newest usable one: the read
side, which the core needs to load a component's weights from a run folder
(:mod:`ldmkit.weights`). The writer is :class:`ldmkit.training.state.CheckpointManager`.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNNNN>/`` holding the files named
below and ``meta.json`` (step, file list and each file's SHA-256), written last: a folder
without a readable ``meta.json`` is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ldmkit.errors import CheckpointError, UnreadableWeightsError
from ldmkit.safetensors_io import read_safetensors

MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
EMA_SHADOW = "ema.shadow."  # a stage-2 checkpoint's EMA weights in training.safetensors


class CheckpointWarning(UserWarning):
    """An unusable checkpoint was skipped (the message names the folder and the bad file)."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unflatten_state(flat: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``{"first_stage.<param>": tensor}`` -> the ``first_stage`` module's state dict."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in flat.items() if k.startswith(start)}


def ema_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA shadow among ``tensors`` (``ema.shadow.denoiser__out__2__weight``) under the
    weights' names (:class:`ldmkit.ema.EMA` keeps a parameter's dots as ``__``)."""
    return {k[len(EMA_SHADOW):].replace("__", "."): v for k, v in tensors.items() if k.startswith(EMA_SHADOW)}


def list_checkpoints(directory: str | os.PathLike) -> list[Checkpoint]:
    """All checkpoint folders in ``directory``, oldest first (not validated)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append(Checkpoint(int(match.group(1)), path))
    return sorted(found, key=lambda c: c.step)


def usable_checkpoints(
    directory: str | os.PathLike,
    *,
    verify: bool = False,
    category: type[CheckpointWarning] = CheckpointWarning,
) -> Iterator[Checkpoint]:
    """Checkpoints in ``directory`` that pass :func:`validate`, newest first; each one skipped
    on the way gets one warning of ``category`` naming it and its bad file. ``verify`` also
    compares every file with the checksum in ``meta.json``."""
    for checkpoint in reversed(list_checkpoints(directory)):
        problem = validate(checkpoint.path, verify=verify)
        if problem is None:
            yield checkpoint
        else:
            skip_warning(checkpoint, problem, category)


def skip_warning(
    checkpoint: Checkpoint, problem: str, category: type[CheckpointWarning] = CheckpointWarning
) -> None:
    warnings.warn(
        f"skipping unusable checkpoint {checkpoint.path}: {problem}",
        category,
        stacklevel=3,
    )


def validate(path: str | os.PathLike, *, verify: bool = False) -> str | None:
    """Why the checkpoint folder at ``path`` is unusable, or None when it is complete.

    Checks that ``meta.json`` parses, that every file it lists exists and that the safetensors
    headers parse; with ``verify``, also each file's SHA-256 (reads every byte)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return f"{META_FILE} is missing (incomplete checkpoint)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = [str(name) for name in meta["files"]]
        checksums = dict(meta.get("sha256") or {})
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return f"{META_FILE} is unreadable: {err}"
    for name in files:
        if not (path / name).is_file():
            return f"{name} is missing"
        if verify and name in checksums and file_sha256(path / name) != checksums[name]:
            return f"{name} is corrupt (its SHA-256 differs from the one in {META_FILE})"
        if name.endswith(".safetensors"):
            try:
                read_safetensors(path / name, keys=())
            except UnreadableWeightsError as err:
                return f"{name} is unreadable: {err.reason}"
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint folder, a run folder (its latest checkpoint) or its ``checkpoints/``."""
    path = Path(path).expanduser()
    match = STEP_DIR.match(path.name)
    if match and path.is_dir():
        problem = validate(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        return Checkpoint(int(match.group(1)), path)
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            latest = next(usable_checkpoints(directory), None)
            if latest is not None:
                return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    raise CheckpointError(
        f"no usable checkpoint under {path} (expected step_<N>/ folders with {META_FILE}, "
        f"in {path} or {path / 'checkpoints'})"
    )
