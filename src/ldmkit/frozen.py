"""Frozen pretrained components stored by reference.

A pretrained network a pipeline uses without training it (a 90 MB text encoder loaded from a
local ``transformers`` folder, say) need not be copied into every pipeline folder: its
weights are already on disk where it was loaded from. A module declares such parts with
``frozen_references()``, returning ``{submodule name: {"source": path, "sha256": digest}}``;
:meth:`ldmkit.Pipeline.save` then leaves those submodules' tensors out of
``model.safetensors`` and writes ``frozen.json`` (each part's state-dict prefix, its source
and the content hash of the source's weight files). :meth:`ldmkit.Pipeline.load` rebuilds the
component from its config — which loads the same source — checks the hash, and fails with one
line naming the part, the source and what to do when the source is gone or changed.
``Pipeline.save(dir, embed_frozen=True)`` embeds them instead (a self-contained folder to
copy to another machine).

Training checkpoints (``<run_dir>/checkpoints/step_N/``) follow the same rule: the trainer
leaves referenced parts out of ``model.safetensors`` and writes ``frozen.json`` beside it
(``trainer.embed_frozen=true`` embeds them); resuming, or loading a component from the run
through ``checkpoint:``, rebuilds the part from its source and checks the hash
(:func:`check_referenced`, :func:`fill_referenced`).

Only frozen parts may be references: every parameter under the prefix must have
``requires_grad=False``, else saving refuses (a trained part must be saved).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ldmkit.errors import LdmkitError

__all__ = [
    "FROZEN_FILE",
    "FrozenReferenceError",
    "check_referenced",
    "fill_referenced",
    "files_digest",
    "frozen_parts",
    "weights_digest",
    "within",
]

FROZEN_FILE = "frozen.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
FILE_SUFFIXES = (".json", ".txt", ".model")  # a part's tokenizer and config files


class FrozenReferenceError(LdmkitError, ValueError):
    """A frozen part saved by reference cannot be restored (its source is gone or changed)."""


_digests: dict[tuple[str, float, int], str] = {}


def weights_digest(source: str | Path) -> str:
    """sha256 over the weight files of ``source`` (a file, or a folder's files with a weight
    suffix, by relative name); cached per path, size and modification time."""
    return _digest(Path(source), WEIGHT_SUFFIXES, lone_file=True)


def files_digest(*sources: str | Path) -> str:
    """sha256 over the files beside the weights that decide what a part computes: the
    tokenizer and config files (``.json``, ``.txt``, ``.model``) of each folder in
    ``sources``. A reference may carry it as ``files_sha256``, checked like ``sha256``."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(_digest(Path(source), FILE_SUFFIXES).encode())
    return digest.hexdigest()


def _digest(path: Path, suffixes: tuple[str, ...], *, lone_file: bool = False) -> str:
    """sha256 over the files of ``path`` with one of ``suffixes``; ``lone_file``: a file
    given as ``path`` counts whatever its suffix."""
    files: Iterable[Path]
    if path.is_file():
        files = [path] if lone_file or path.suffix in suffixes else []
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_mtime, stat.st_size)
        if key not in _digests:
            h = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
            _digests[key] = h.hexdigest()
        digest.update(
            file.relative_to(path).as_posix().encode() if path.is_dir() else file.name.encode()
        )
        digest.update(_digests[key].encode())
    return digest.hexdigest()


def frozen_parts(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{state-dict prefix: reference}`` for every part some module of ``model`` declares
    through ``frozen_references()``."""
    parts: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        declare = getattr(module, "frozen_references", None)
        if not callable(declare):
            continue
        for sub, reference in (declare() or {}).items():
            prefix = f"{name}.{sub}" if name else sub
            part = module.get_submodule(sub)
            if any(p.requires_grad for p in part.parameters()):
                raise FrozenReferenceError(
                    f"{prefix} is declared frozen but has trainable parameters; it must be saved "
                    "with the weights (train it, or freeze it with requires_grad_(False))"
                )
            parts[prefix] = {"source": str(reference["source"]), "sha256": str(reference["sha256"])}
            if "files_sha256" in reference:
                parts[prefix]["files_sha256"] = str(reference["files_sha256"])
    return parts


def under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def write_manifest(parts: dict[str, dict[str, Any]]) -> str:
    """The text of ``frozen.json`` for ``parts``."""
    return json.dumps({"format": 1, "parts": parts}, indent=2) + "\n"


def check_restored(
    directory: Path, saved: dict[str, dict[str, Any]], built: dict[str, dict[str, Any]]
) -> None:
    """The pipeline built from the config must hold the same frozen parts, from sources with
    the same content, as when it was saved."""
    for prefix, reference in saved.items():
        now = built.get(prefix)
        if now is None:
            raise FrozenReferenceError(
                f"{directory}: {prefix} was saved as a reference to {reference['source']}, but the "
                "component built from config.yaml no longer declares it frozen; re-save the pipeline "
                "with embed_frozen=True where it still loads"
            )
        if now["sha256"] != reference["sha256"]:
            raise FrozenReferenceError(
                f"{directory}: the frozen weights of {prefix} changed since it was saved "
                f"(source {now['source']}, sha256 {now['sha256'][:12]}... now, "
                f"{reference['sha256'][:12]}... then); restore that source, or save with "
                "embed_frozen=True (trainer.embed_frozen=true in training) from a copy that has "
                "the original weights"
            )
        # tokenizer and config files: compared where the reference kept their hash (saved since)
        if "files_sha256" in reference and now.get("files_sha256", reference["files_sha256"]) != reference["files_sha256"]:
            raise FrozenReferenceError(
                f"{directory}: the tokenizer or config files of {prefix} changed since it was saved "
                f"(source {now['source']}: the same weights, other .json/.txt/.model files); restore "
                "those files, or save with embed_frozen=True (trainer.embed_frozen=true in training), "
                "which copies them, from a copy that has the original files"
            )


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / FROZEN_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["parts"])
    except (ValueError, KeyError, TypeError) as err:
        raise FrozenReferenceError(f"{path} is not a frozen-parts manifest: {err}") from err


def within(parts: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    """The parts under ``prefix`` (a component's role), with the prefix stripped."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in parts.items() if k.startswith(start)}


def check_referenced(
    module: nn.Module, references: dict[str, dict[str, Any]], where: Path, role: str = ""
) -> None:
    """The parts ``where`` keeps by reference (``references``, relative to the component
    ``role``) must be the ones ``module`` built, from sources with the content they had when
    ``where`` was saved (else :class:`FrozenReferenceError`, naming ``<role>.<name>``)."""
    if not references:
        return
    name = (lambda key: f"{role}.{key}") if role else (lambda key: key)
    check_restored(
        where,
        {name(k): v for k, v in references.items()},
        {name(k): v for k, v in frozen_parts(module).items()},
    )


def fill_referenced(
    module: nn.Module, tensors: dict[str, Any], references: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``tensors`` (a state dict saved without the referenced parts) completed with those
    parts from ``module``, which built them from their sources (check them first with
    :func:`check_referenced`)."""
    if not references:
        return tensors
    own = {k: v for k, v in module.state_dict().items() if under(k, references)}
    return {**own, **tensors}
