"""Crash-safe training checkpoints.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNNNN>/`` holding

* ``model.safetensors`` — the model's weights, keys prefixed by component
  (``first_stage.encoder.conv_in.weight``: the layout :class:`ldmkit.pipeline.Pipeline` uses);
* ``training.safetensors`` — tensors only training needs (e.g. the discriminator);
* ``trainer_state.pt`` — optimizer states, step, data position and RNG states (read back
  with ``torch.load(weights_only=True)``: plain containers and tensors, no code);
* ``config.yaml`` — the resolved config of the run;
* ``meta.json`` — step, file list and each file's SHA-256, written last.

The folder is assembled under a temporary name, every file fsynced, then renamed into place
with ``os.replace`` (atomic on POSIX) and the parent directory fsynced: a run killed at any
moment leaves either the complete checkpoint or none, never a torn one. Temporary folders
of killed runs are removed on the next start. A file damaged later (disk errors, a copy cut
short, an edit) no longer matches its checksum: :meth:`CheckpointManager.usable` then skips
that checkpoint with one warning naming the file, and training resumes from an older one.

This module writes checkpoints; reading them (the layout, :func:`validate`,
:func:`resolve_checkpoint`) is :mod:`ldmkit.checkpoint_layout`, in the core, because loading a
component's weights from a run folder needs it too. Its names are re-exported here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# the read side of the layout is core (the weights loader reads run folders too); it is
# re-exported here, where the trainer and its callers have always found it
from ldmkit import checkpoint_layout, frozen
from ldmkit.checkpoint_layout import (
    CONFIG_FILE,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAINING_FILE,
    Checkpoint,
    file_sha256,
    list_checkpoints,
    resolve_checkpoint,
    unflatten_state,
    usable_checkpoints,
    validate,
)
from ldmkit.errors import CheckpointError
from ldmkit.io import WriteError, _fsync_dir, follow_umask, process_is_gone, write_failure
from ldmkit.safetensors_io import read_safetensors

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

_TMP_PREFIX = ".tmp-"  # .tmp-[old-|pruned-]step_<N>-<pid of the writer>
_TMP_PID = re.compile(r"-(\d+)$")


class CheckpointWarning(checkpoint_layout.CheckpointWarning):
    """A checkpoint the trainer skipped (the message names the folder and the bad file).
    Its own class here: ``ldmkit train`` prints the trainer's warnings in one line."""


def skip_warning(checkpoint: Checkpoint, problem: str) -> None:
    checkpoint_layout.skip_warning(checkpoint, problem, CheckpointWarning)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def flatten_state(
    modules: dict[str, torch.nn.Module | dict[str, Tensor]], *, skip: Iterable[str] = ()
) -> dict[str, Tensor]:
    """``{"first_stage": module}`` -> ``{"first_stage.<param>": tensor}`` (contiguous, CPU),
    leaving out the keys under the prefixes in ``skip`` (frozen parts kept by reference)."""
    skip = tuple(skip)
    flat: dict[str, Tensor] = {}
    for prefix, module in modules.items():
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for key, value in state.items():
            if skip and frozen.under(f"{prefix}.{key}", skip):
                continue
            # safetensors refuses aliased storage; a clone per tensor is cheap next to the write
            flat[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return flat


class CheckpointManager:
    """Writes, lists, validates and prunes the checkpoints of one run."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (trainer.keep_checkpoints), got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = int(keep_last)

    # -- writing -----------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: dict[str, Tensor],
        training: dict[str, Tensor] | None = None,
        state: dict[str, Any] | None = None,
        config_yaml: str | None = None,
        frozen_parts: dict[str, dict[str, Any]] | None = None,
    ) -> Checkpoint:
        """Write the checkpoint of ``step``. ``frozen_parts`` (``{prefix: reference}``, see
        :mod:`ldmkit.frozen`) are the parts left out of ``model``; they go to ``frozen.json``.
        A read-only or full disk raises
        :class:`~ldmkit.io.WriteError` naming the checkpoint; the ones before stay intact."""
        final = self.directory / f"step_{step:09d}"
        try:
            return self._save(
                step, final, model=model, training=training, state=state, config_yaml=config_yaml,
                frozen_parts=frozen_parts,
            )
        except Exception as err:
            tmp = self.directory / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
            code = write_failure(err, tmp)
            if code is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give a full disk back what the partial files took
            intact = [c.path.name for c in self.list() if c.step != step]
            note = f"the checkpoints before it are intact (newest: {intact[-1]})" if intact else None
            raise WriteError(final, code, note) from err

    def _save(
        self,
        step: int,
        final: Path,
        *,
        model: dict[str, Tensor],
        training: dict[str, Tensor] | None,
        state: dict[str, Any] | None,
        config_yaml: str | None,
        frozen_parts: dict[str, dict[str, Any]] | None = None,
    ) -> Checkpoint:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = [MODEL_FILE]
        save_file(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        if training:
            save_file(training, str(tmp / TRAINING_FILE), metadata={"step": str(step)})
            files.append(TRAINING_FILE)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        if config_yaml is not None:
            (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
            files.append(CONFIG_FILE)
        if frozen_parts:
            (tmp / frozen.FROZEN_FILE).write_text(frozen.write_manifest(frozen_parts), encoding="utf-8")
            files.append(frozen.FROZEN_FILE)
        for name in files:
            follow_umask(tmp / name)  # safetensors writes 0600
            _fsync_file(tmp / name)
        checksums = {name: file_sha256(tmp / name) for name in files}
        meta = {"step": step, "files": files, "sha256": checksums, "time": time.time()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _fsync_file(tmp / META_FILE)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a rerun): swap, then drop the old
            old = self.directory / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.directory)
        self.prune()
        return Checkpoint(step, final)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints.

        A folder is first renamed to a temporary name (atomically), then deleted: a kill
        during the deletion leaves a temporary folder, never a half-deleted checkpoint."""
        for checkpoint in self.list()[: -self.keep_last]:
            doomed = self.directory / f"{_TMP_PREFIX}pruned-{checkpoint.path.name}-{os.getpid()}"
            os.replace(checkpoint.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def remove_incomplete(self) -> list[Path]:
        """Delete the temporary folders (``.tmp-...-<pid>``) that processes no longer
        running left behind; those of a live process are its checkpoint in the making."""
        removed = []
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                writer = _TMP_PID.search(path.name)
                if path.name.startswith(_TMP_PREFIX) and (writer is None or process_is_gone(int(writer[1]))):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    # -- reading -----------------------------------------------------------------------
    def list(self) -> list[Checkpoint]:
        """All checkpoint folders, oldest first (not validated)."""
        return list_checkpoints(self.directory)

    def latest(self, *, verify: bool = False) -> Checkpoint | None:
        """The newest checkpoint that passes :func:`validate` (invalid ones are skipped
        with a warning, never deleted)."""
        return next(self.usable(verify=verify), None)

    def usable(self, *, verify: bool = False) -> Iterator[Checkpoint]:
        """Checkpoints that pass :func:`validate`, newest first; each one skipped on the way
        gets one :class:`CheckpointWarning` naming it and its bad file. ``verify`` also
        compares every file with the checksum in ``meta.json``."""
        yield from usable_checkpoints(self.directory, verify=verify, category=CheckpointWarning)


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    path = checkpoint.path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint.path} has no {STATE_FILE}: it cannot resume training")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"cannot read {path}: {_one_line(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read {path}: it holds a {type(state).__name__}, not the trainer state")
    return state


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
