"""Files a pipeline folder carries for its components, so that it stands alone.

A component that reads files or folders named by its config options when it is built (a
tokenizer vocabulary, a pretrained encoder's ``config.json`` and tokenizer) declares them with
:meth:`ldmkit.interfaces.Component.pipeline_files`, returning ``{option: value}``:

* a :class:`~pathlib.Path`: the file or folder is copied into the pipeline folder, under
  ``files/<config key>/`` (a folder without its weight files: a pipeline's weights are in
  ``model.safetensors``, or referenced by ``frozen.json``), and ``config.yaml`` names the copy
  by its path relative to the folder;
* anything else: the value written for that option as it is (``pretrained: false`` once the
  weights are embedded; an absolute path to a source left in place).

:meth:`ldmkit.Pipeline.save` applies them to the config it writes (never to the pipeline's own
config) and lists the copied options in ``files.json``; :meth:`ldmkit.Pipeline.load` reads the
listed options relative to the folder, from any working directory. A folder without
``files.json`` (written before) is read as it is. A training run records each declared path
absolute in its ``config.yaml`` and checkpoints (:func:`absolute_paths`), so it resumes from
another working directory.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldmkit.errors import ConfigError
from ldmkit.frozen import WEIGHT_SUFFIXES
from ldmkit.io import atomic_write_text

__all__ = ["FILES_DIR", "FILES_MANIFEST", "absolute_paths", "bundle", "declared", "resolve"]

FILES_MANIFEST = "files.json"
FILES_DIR = "files"
#: files a copied folder leaves out (weights; a pipeline keeps its own)
LEFT_OUT = (*WEIGHT_SUFFIXES, ".onnx", ".gguf")
#: the pipeline's components, whose config key is their attribute name when built by hand
ROLES = ("first_stage", "denoiser", "conditioner", "sampler")


def declared(model: nn.Module, *, embed_frozen: bool) -> Iterator[tuple[str, Any]]:
    """``(dotted config key, value)`` for every option the components in ``model`` declare
    through ``pipeline_files()``; a component's key is the one it was built from
    (``conditioner``, ``conditioner.parts[0]``), else its role in the pipeline."""
    for name, module in model.named_modules():
        declare = getattr(module, "pipeline_files", None)
        if not callable(declare):
            continue
        key = getattr(module, "config_key", None) or (name if name in ROLES else None)
        options = declare(embed_frozen=embed_frozen) or {}
        if options and key is None:
            raise ConfigError(
                f"{type(module).__name__} at {name!r} declares files ({', '.join(options)}) but was not "
                "built from a config key; build it through the registry"
            )
        for option, value in options.items():
            yield f"{key}.{option}", value


def absolute_paths(cfg: DictConfig, modules: Iterable[nn.Module]) -> None:
    """Write the options the components of ``modules`` declare (without embedding) into
    ``cfg``, each path absolute: a run's config, read again from another working directory on
    resume."""
    for module in modules:
        for key, value in declared(module, embed_frozen=False):
            if isinstance(value, Path):
                value = str(value.expanduser().absolute())
            OmegaConf.update(cfg, key, value, force_add=True)


def bundle(model: nn.Module, config: DictConfig, directory: Path, *, embed_frozen: bool) -> DictConfig:
    """A copy of ``config`` for the pipeline folder ``directory``: the files ``model``'s
    components declare copied under ``directory/files/`` and named relative to it, listed in
    ``files.json`` (removed when nothing is copied); other declared values set as they are."""
    cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    copied: dict[str, str] = {}
    for key, value in declared(model, embed_frozen=embed_frozen):
        if isinstance(value, Path):
            relative = _copy(value.expanduser(), directory, key)
            copied[key] = relative
            value = relative
        OmegaConf.update(cfg, key, value, force_add=True)
    manifest = directory / FILES_MANIFEST
    if copied:
        atomic_write_text(manifest, json.dumps({"format": 1, "options": copied}, indent=2) + "\n")
    else:
        manifest.unlink(missing_ok=True)
    return cfg


def _copy(source: Path, directory: Path, key: str) -> str:
    """Copy ``source`` (a file, or a folder without weight files) to
    ``directory/files/<key>/<its name>``, replacing what was there; the copy's relative path."""
    if not source.exists():
        raise ConfigError(f"cannot save the pipeline: {key} names {str(source)!r}, which does not exist")
    relative = Path(FILES_DIR) / re.sub(r"[^\w.-]+", "_", key) / (source.resolve().name or "root")
    target = directory / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    # copied beside the target first: the source may be the target itself (a loaded pipeline
    # saved again into its own folder)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".copy-") as tmp:
        staged = Path(tmp) / "copy"
        if source.is_dir():
            shutil.copytree(source, staged, ignore=lambda _, names: [n for n in names if n.endswith(LEFT_OUT)])
        else:
            shutil.copy2(source, staged)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        staged.rename(target)
    return relative.as_posix()


def resolve(cfg: DictConfig, directory: Path) -> DictConfig:
    """``cfg`` (a pipeline folder's config) with the options ``directory/files.json`` lists
    read relative to ``directory``; unchanged without one (a folder written before)."""
    path = directory / FILES_MANIFEST
    if not path.is_file():
        return cfg
    try:
        options = dict(json.loads(path.read_text())["options"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is not a pipeline files manifest: {err}") from None
    for key, relative in options.items():
        OmegaConf.update(cfg, key, str(directory.absolute() / relative), force_add=True)
    return cfg
