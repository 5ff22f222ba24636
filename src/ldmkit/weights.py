"""Loading a component's weights from a checkpoint named in its config (``checkpoint:``).

Accepted sources, all read without executing code:

* a run folder of ``ldmkit train``: a stage-2 run's exported ``pipeline/`` (the EMA weights
  ``ldmkit sample`` and ``trainer.init_from`` take), else its newest valid checkpoint; or one
  ``step_<N>/`` folder (its EMA weights where it has them);
* a folder written by :meth:`ldmkit.pipeline.Pipeline.save`;
* a ``.safetensors`` file;
* a foreign pickled checkpoint (``.ckpt``, ``.pt``, ``.pth``, ``.bin``), opened with
  ``torch.load(weights_only=True)`` so that no pickled code runs; its ``state_dict`` entry
  is used when present.

Keys prefixed with the component's role (``first_stage.encoder...``, the layout of ldmkit's
checkpoints) are selected and stripped; a file without such keys is taken whole. Frozen
pretrained parts that a checkpoint or pipeline folder keeps by reference (``frozen.json``,
:mod:`ldmkit.frozen`) are taken from the component as built from its config, after checking
that their source still has the saved content.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit import frozen
from ldmkit.checkpoint_layout import (
    EMA_SHADOW,
    MODEL_FILE,
    STEP_DIR,
    TRAINING_FILE,
    ema_weights,
    resolve_checkpoint,
    unflatten_state,
)
from ldmkit.errors import CheckpointError, UnreadableWeightsError, WeightsError, first_few
from ldmkit.safetensors_io import read_safetensors

__all__ = ["PICKLE_SUFFIXES", "WeightsError", "load_component_weights", "read_weights"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _model_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file() and not (path / "checkpoints").is_dir():
        return path / MODEL_FILE
    exported = path / "pipeline" / MODEL_FILE
    if (path / "checkpoints").is_dir() and exported.is_file():
        return exported  # a stage-2 run: the weights of its newest checkpoint that sampling uses (EMA)
    try:
        return resolve_checkpoint(path).model_file
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(str(err)) from err


def _torch_load(file: Path) -> object:
    """``torch.load`` that runs no pickled code; memory-mapped (tensors stay on disk until
    used, so a 4 GB checkpoint costs no 4 GB copy) where the file is in the zip format."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    with warnings.catch_warnings():  # a plain pickle's protocol: it is refused or read anyway
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(file, map_location="cpu", weights_only=True)  # the legacy format


def _file_head(file: Path) -> bytes | None:
    """The first bytes of ``file`` (None when it cannot be read)."""
    try:
        with open(file, "rb") as handle:
            return handle.read(16)
    except OSError:
        return None


def _unpickling_problem(err: Exception, file: Path | None = None) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in ldmkit's words (PyTorch's own
    message suggests ``weights_only=False``, which would run whatever code the file names)."""
    head = _file_head(file) if file is not None else None
    if head == b"":
        return "it is empty (0 bytes): a copy or download that did not finish?"
    if head is not None and not head.startswith((b"PK\x03\x04", b"\x80")):  # neither zip nor pickle
        return (f"it is not a PyTorch checkpoint (neither a zip archive nor a pickle: it begins with "
                f"{head[:16]!r}); a .ckpt/.pt/.pth file is written by torch.save")
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"it contains objects ldmkit will not unpickle ({refused[1]}): ldmkit reads only tensors "
            "and plain containers from a pickle (pickled code is never run); save the state dict "
            "as .safetensors where the checkpoint was made"
        )
    if isinstance(err, pickle.UnpicklingError):
        stopped = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", text, re.S)
        where = f"; unpickling stopped at: {stopped[1].splitlines()[0]}" if stopped else ""
        return f"it is not a weights-only checkpoint (pickled code is never run{where})"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"it is not a weights-only checkpoint (pickled code is never run): {first}"


def _weights_file(source: str | os.PathLike) -> Path:
    """The file holding the tensors of a checkpoint source (see the module docstring)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsError(f"checkpoint {path} does not exist")
    return _model_file(path)


def read_weights(source: str | os.PathLike, *, prefix: str | None = None) -> dict[str, Tensor]:
    """The tensors of a checkpoint source (see the module docstring): all of them, or those
    whose names start with ``prefix`` (the others are not read from a ``.safetensors`` file)."""
    file = _weights_file(source)
    if file.suffix in PICKLE_SUFFIXES:
        try:
            state = _torch_load(file)
        except Exception as err:  # noqa: BLE001 - unpickling fails in many ways
            raise UnreadableWeightsError(file, _unpickling_problem(err, file)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UnreadableWeightsError(file, f"it holds a {type(state).__name__}, not a state dict")
        return {k: v for k, v in state.items() if isinstance(v, Tensor) and k.startswith(prefix or "")}
    return read_safetensors(file, prefix=prefix)


def _ema_shadow(file: Path, role: str) -> dict[str, Tensor]:
    """The EMA weights of ``role`` in the checkpoint folder holding ``file`` (its
    ``training.safetensors``: ``ema.shadow.denoiser__out__2__weight``), under the component's
    own names; empty for any other file, or a checkpoint without EMA."""
    training = file.parent / TRAINING_FILE
    if file.name != MODEL_FILE or not STEP_DIR.match(file.parent.name) or not training.is_file():
        return {}
    return unflatten_state(ema_weights(read_safetensors(training, prefix=f"{EMA_SHADOW}{role}__")), role)


def load_component_weights(module: nn.Module, source: str | os.PathLike, role: str) -> None:
    """Load ``source`` into ``module`` (strict); errors name the file and the component."""
    file = _weights_file(source)
    # frozen parts the folder keeps by reference (frozen.json) come from their source
    references = frozen.within(frozen.read_manifest(file.parent), role) if file.name == MODEL_FILE else {}
    state = unflatten_state(read_weights(file, prefix=f"{role}."), role)  # not the other components'
    state.update(_ema_shadow(file, role))  # a stage-2 checkpoint's EMA weights, as init_from and sampling take
    if not state and not references:
        state = read_weights(file)  # a file of this component alone
    frozen.check_referenced(module, references, file.parent, role)
    state = frozen.fill_referenced(module, state, references)
    own = module.state_dict()
    reshaped = [f"{k} is {list(v.shape)} there but {list(own[k].shape)} in the model"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]  # fmt: skip
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if reshaped or missing or unexpected:
        problems = [first_few(reshaped, most=1)] if reshaped else []
        problems += [f"{what} {keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                     for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]  # fmt: skip
        raise WeightsError(
            f"the weights in {source} do not fit the {role} built from its config: {'; '.join(problems)} "
            f"(is {role}'s config the one those weights were trained with?)"
        )
    module.load_state_dict(state, strict=True)
