"""``trainer.init_from``: start a fresh run from trained weights.

The source is detected from the path (:func:`read_source`), read without running code, and
brought into the pipeline layout (``first_stage.*``, ``denoiser.*``, ``conditioner.*``,
``scale_factor``; stage 1 also ``loss.*``, the discriminator):

* a pipeline folder (``config.yaml`` + ``model.safetensors``, :meth:`ldmkit.Pipeline.save`);
* a training run folder: for stage 2 its exported ``pipeline/`` (the EMA weights, what
  ``ldmkit sample --checkpoint`` reads), else its newest checkpoint; one ``checkpoints/step_N``
  folder (stage 2: its EMA weights where it has them);
* the paper's ``.ckpt`` (:meth:`ldmkit.Pipeline.from_compvis` with ``trainer.init_preset`` or
  ``trainer.init_config``; a first-stage checkpoint for stage 1);
* a diffusers folder (``model_index.json``, :meth:`ldmkit.Pipeline.from_diffusers`).

A LoRA run's adapter folder (its ``pipeline/``) and its checkpoints give their base with the
adapter merged in (:func:`ldmkit.lora.merge`).

:func:`load_components` loads every tensor that fits into the modules the run built from its
config, and says per component what was loaded, newly initialised (in the model, not in the
source) and skipped (in the source, not in the model, or another shape). A component with a
``checkpoint:`` key of its own keeps those weights. With ``trainer.init_strict=false`` a tensor
of another shape is offered to the module that owns it: a module may define
``adapt_loaded_tensor(name, source, own) -> Tensor | None`` (``name`` relative to it) to keep
the part that fits; otherwise the tensor keeps its fresh initialisation and is reported as
skipped. An ``adapt_loaded_tensor`` that takes a keyword ``source_options`` gets the source's
config of its component (None where unknown) to read how the source laid the tensor out, and is
offered the tensors of the same shape too (in strict mode as well; None: loaded as they are):
``class_label``'s embedding keeps the rows of the labels both tables have (of the class names,
where both configs name their classes and the names differ) and moves the source's null row,
found from its ``null_index``, to its own. A component may also define
``init_from_note(source_options) -> str | None``: a line the load report prints under it.

Only a fresh run is initialised: a run that resumes takes its weights from its checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit import frozen
from ldmkit.checkpoint_layout import (
    MODEL_FILE,
    TRAINING_FILE,
    Checkpoint,
    ema_weights,
    resolve_checkpoint,
    unflatten_state,
)
from ldmkit.errors import CheckpointError, ConfigError, LdmkitError
from ldmkit.lora import ADAPTER_CONFIG
from ldmkit.safetensors_io import read_safetensors
from ldmkit.training.errors import TrainingError

__all__ = [
    "ComponentLoad",
    "InitSource",
    "adopt_source_architecture",
    "compose_training_config",
    "initialize",
    "load_components",
    "read_source",
    "source_config",
]

EXPECTED = (
    "a pipeline folder (config.yaml + model.safetensors), a training run folder or one of its "
    "checkpoints/step_N folders, a paper .ckpt (with trainer.init_preset or trainer.init_config) "
    "or a diffusers folder (model_index.json)"
)
SHOWN = 5  # names listed per kind in the report
LORA_MERGED = "LoRA adapter merged into its base"


@dataclass
class InitSource:
    """Weights to start from, in the pipeline layout, and where they come from."""

    path: Path
    what: str  # e.g. "the run's exported pipeline/ (EMA weights)"
    weights: dict[str, Tensor]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)  # frozen.json parts
    directory: Path | None = None  # where frozen.json was read
    loss_type: str | None = None  # what a paper checkpoint was trained with (its config's loss_type)
    config: Any = None  # the source's own config (a DictConfig), where it has one

    def options(self, component: str) -> Any:
        """The source's config of ``component`` (``conditioner``), None where unknown."""
        return None if self.config is None else self.config.get(component)

    @property
    def scale_factor(self) -> float | None:
        value = self.weights.get("scale_factor")
        return None if value is None else float(value)


@dataclass
class ComponentLoad:
    """What :func:`load_components` did with one component."""

    name: str
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # partly copied by adapt_loaded_tensor
    new: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # with the reason
    kept: str | None = None  # its own checkpoint: key, not loaded from the source
    kept_the_sources: bool = False  # the weights kept are the source's (the checkpoint it was trained with)
    notes: list[str] = field(default_factory=list)  # the component's own (init_from_note)

    @property
    def holds_the_sources(self) -> bool:
        """Whether the component holds the source's weights, every tensor of them."""
        return self.kept_the_sources if self.kept else not (self.new or self.resized or self.skipped)

    def line(self) -> str:
        if self.kept:
            same = ", the source's weights" if self.kept_the_sources else ""
            return f"  {self.name}: not loaded (its own {self.kept} is kept{same})"
        parts = [f"{len(self.loaded)} loaded"]
        if self.resized:
            parts.append(f"{len(self.resized)} resized {_names(self.resized)}")
        parts.append(f"{len(self.new)} new" + (f" {_names(self.new)}" if self.new else ""))
        parts.append(f"{len(self.skipped)} skipped" + (f" {_names(self.skipped)}" if self.skipped else ""))
        return f"  {self.name}: " + ", ".join(parts) + "".join(f"\n    {note}" for note in self.notes)


def _names(names: list[str]) -> str:
    more = f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return "(" + ", ".join(names[:SHOWN]) + more + ")"


def _shape(tensor: Tensor) -> list[int]:
    return list(tensor.shape)


# -- reading a source -----------------------------------------------------------------------
def _missing(path: Path, problem: str) -> TrainingError:
    return TrainingError(f"trainer.init_from={path} {problem}; expected {EXPECTED}")


def _existing(path: str | Path, preset: str | None = None, config: str | Path | None = None) -> Path:
    """``path``, which exists; a paper translation (``init_preset``/``init_config``) only
    with a checkpoint file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise _missing(path, "does not exist")
    for key, value in (("init_preset", preset), ("init_config", config)):
        if value is not None and path.is_dir():
            raise TrainingError(
                f"trainer.{key}={value} reads a paper .ckpt, but trainer.init_from={path} is a folder "
                f"that says what it holds: remove trainer.{key}"
            )
    return path


def _check_translation(path: Path, preset: str | None, config: str | Path | None) -> None:
    """A pickled checkpoint is read through the paper's config or a stored translation."""
    from ldmkit.weights import PICKLE_SUFFIXES

    if path.suffix not in PICKLE_SUFFIXES:
        raise _missing(path, "is a file but not a checkpoint (.ckpt, .pt, .pth, .bin)")
    if preset is None and config is None:
        raise TrainingError(
            f"trainer.init_from={path} is a pickled checkpoint: give the paper's config.yaml as "
            "trainer.init_config=PATH, or a stored translation as trainer.init_preset=NAME (docs/interop.md)"
        )


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors of reading ``path`` as one :class:`TrainingError` naming ``trainer.init_from``."""
    try:
        yield
    except TrainingError:
        raise
    except (LdmkitError, FileNotFoundError, CheckpointError) as err:
        raise TrainingError(f"trainer.init_from={path}: {err}") from err


def read_source(
    path: str | Path, *, stage: str, preset: str | None = None, config: str | Path | None = None
) -> InitSource:
    """The weights at ``path`` (see the module docstring) for a run of ``stage``."""
    path = _existing(path, preset, config)
    with _reading(path):
        if path.is_file():
            _check_translation(path, preset, config)
            return _compvis(path, preset, config)
        if (path / "model_index.json").is_file():
            from ldmkit.pipeline import Pipeline

            pipeline = Pipeline.from_diffusers(path)
            return InitSource(path, "a diffusers folder", dict(pipeline.state_dict()), config=pipeline.config)
        if (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
            return _run(path, stage)
        if (path / "config.yaml").is_file() and (path / MODEL_FILE).is_file():
            return _folder(path, "a pipeline folder")
        if (path / "config.yaml").is_file() and (path / ADAPTER_CONFIG).is_file():
            return _adapter_folder(path, "a pipeline folder")
    raise _missing(path, "is not a source it can read")


def _folder(path: Path, what: str, folder: Path | None = None) -> InitSource:
    """A folder written by ``Pipeline.save`` (``folder``, else ``path``): its tensors, read as
    they are (nothing is built), and the paper's loss type when it was converted from a .ckpt."""
    from omegaconf import OmegaConf

    folder = folder or path
    config = _saved_config(folder / "config.yaml")
    # a paper .ckpt converted by `ldmkit convert compvis` records the loss it was trained with
    loss_type = None if config is None else OmegaConf.select(config, "choices.loss_type", default=None)
    return InitSource(path, what, read_safetensors(folder / MODEL_FILE), frozen.read_manifest(folder), folder,
                      loss_type, config=config)  # fmt: skip


def _saved_config(path: Path) -> Any:
    """The config in a source's ``config.yaml`` (None where there is none); YAML that does not
    parse, or a file that holds no mapping, is a :class:`ConfigError` naming it."""
    import yaml
    from omegaconf import DictConfig

    from ldmkit.config import load_saved_config, yaml_problem

    if not path.is_file():
        return None
    try:
        cfg = load_saved_config(path)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not YAML: {yaml_problem(err)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} holds a list, not a mapping of config groups")
    return cfg


def _adapter_folder(path: Path, what: str, folder: Path | None = None) -> InitSource:
    """An adapter folder (a LoRA run's ``pipeline/``, :mod:`ldmkit.lora`): its base with the
    adapter merged in, as ``ldmkit lora merge`` writes it."""
    from ldmkit import lora
    from ldmkit.pipeline import Pipeline

    try:
        pipeline = Pipeline.load(folder or path)
    except ValueError as err:  # LoraError, or weights that do not fit the config
        raise TrainingError(f"trainer.init_from={path}: {err}") from err
    lora.merge(pipeline)
    return InitSource(path, f"{what}, its {LORA_MERGED}", dict(pipeline.state_dict()), config=pipeline.config)


def _merged_checkpoint(checkpoint: Checkpoint, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA run's checkpoint weights (the base and the adapter under peft's names) with the
    adapter merged in: the run's model rebuilt from the checkpoint's ``config.yaml``."""
    from omegaconf import open_dict

    from ldmkit import lora
    from ldmkit.pipeline import Pipeline

    config = checkpoint.path / "config.yaml"
    if not config.is_file():
        raise TrainingError(f"{checkpoint.path} holds a LoRA adapter but no config.yaml to merge it with")
    cfg = _saved_config(config)
    with open_dict(cfg):
        for group in ("first_stage", "denoiser", "conditioner"):  # the weights are all here
            if "checkpoint" in (cfg.get(group) or {}):
                cfg[group].checkpoint = None
    pipeline = Pipeline.from_config(cfg)
    lora.add_lora(pipeline, lora.from_options(pipeline, cfg.trainer.get("lora") or {}))
    pipeline.load_state_dict(weights, strict=False)
    lora.merge(pipeline)
    return dict(pipeline.state_dict())


def _run(path: Path, stage: str) -> InitSource:
    exported = path / "pipeline"
    if stage == "ldm" and (exported / MODEL_FILE).is_file() and (exported / "config.yaml").is_file():
        source = _folder(path, "", exported)
        ema = (source.config.get("trainer") or {}).get("ema") or {}  # what export_pipeline wrote
        weights = "EMA" if ema.get("enabled", True) and ema.get("use_for_sampling", True) else "raw"
        source.what = f"the run's exported pipeline/ ({weights} weights, what `ldmkit sample --checkpoint` reads)"
        return source
    if stage == "ldm" and (exported / ADAPTER_CONFIG).is_file() and (exported / "config.yaml").is_file():
        return _adapter_folder(path, "the run's exported pipeline/ (EMA weights)", exported)
    checkpoint = resolve_checkpoint(path)
    weights = read_safetensors(checkpoint.model_file)
    extra = read_safetensors(checkpoint.path / TRAINING_FILE) if (checkpoint.path / TRAINING_FILE).is_file() else {}
    what = f"checkpoint {checkpoint.path.name}"
    if "scale.scale_factor" in extra:  # stage 2's
        weights["scale_factor"] = extra["scale.scale_factor"]
    if stage == "ldm":
        ema = ema_weights(extra)
        if ema:
            weights.update(ema)
            what += " (EMA weights)"
        if any(".lora_" in k for k in weights):
            scale = {k: v for k, v in weights.items() if k == "scale_factor"}  # the run's, not the config's
            merged = _merged_checkpoint(checkpoint, weights)
            weights = {**{k: v for k, v in merged.items() if k != "scale_factor"}, **scale}
            what += f", its {LORA_MERGED}"
    else:
        weights.update({k: v for k, v in extra.items() if k.startswith("loss.")})  # the discriminator
    return InitSource(path, what, weights, frozen.read_manifest(checkpoint.path), checkpoint.path,
                      config=_saved_config(checkpoint.path / "config.yaml"))  # fmt: skip


def _compvis(path: Path, preset: str | None, config: str | Path | None) -> InitSource:
    from ldmkit.interop import compvis
    from ldmkit.pipeline import Pipeline

    model = compvis.translation(config, preset)
    if model.kind == "first_stage":
        state, _ = compvis.convert_state_dict(compvis.load_checkpoint(path), model)
        return InitSource(path, "a paper first-stage checkpoint", {f"first_stage.{k}": v for k, v in state.items()})
    pipeline = Pipeline.from_compvis(path, config, preset=preset)
    weights = "EMA" if pipeline.config.choices.get("weights") == "ema" else "raw"
    return InitSource(path, f"a paper checkpoint ({weights} weights)", dict(pipeline.state_dict()),
                      loss_type=model.loss_type, config=pipeline.config)  # fmt: skip


# -- loading --------------------------------------------------------------------------------
def _adapter(component: nn.Module, name: str):
    """The innermost module above ``name`` that defines ``adapt_loaded_tensor``, and
    ``name`` relative to it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        try:
            module = component.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        adapt = getattr(module, "adapt_loaded_tensor", None)
        if callable(adapt):
            return adapt, ".".join(parts[cut:])
    return None, name


def _reads_options(adapt: Any) -> bool:
    """Whether an ``adapt_loaded_tensor`` (or the module defining one) takes ``source_options``."""
    adapt = getattr(adapt, "adapt_loaded_tensor", adapt)
    return callable(adapt) and "source_options" in inspect.signature(adapt).parameters


def _adapt(component: nn.Module, name: str, value: Tensor, own: Tensor, source: InitSource, prefix: str):
    """What the module owning ``name`` makes of the source's ``value`` (None: nothing); one that
    takes ``source_options`` gets the source's config of ``prefix`` when it is the component."""
    adapt, local = _adapter(component, name)
    if adapt is None or value.dim() != own.dim():
        return None
    options = {"source_options": source.options(prefix) if local == name else None} if _reads_options(adapt) else {}
    return adapt(local, value, own, **options)


def load_components(
    modules: Mapping[str, nn.Module], source: InitSource, *, strict: bool, keep: Mapping[str, str] | None = None
) -> list[ComponentLoad]:
    """Load ``source`` into each of ``modules`` (``{prefix: module}``), in place. ``keep``:
    components left alone (``{prefix: why}``). Raises :class:`TrainingError` in ``strict``
    mode when a tensor's shape differs."""
    keep = keep or {}
    results = []
    for prefix, module in modules.items():
        result = ComponentLoad(prefix)
        results.append(result)
        if prefix in keep:
            result.kept = keep[prefix]
            theirs, own = unflatten_state(source.weights, prefix), module.state_dict()
            result.kept_the_sources = own.keys() == theirs.keys() and all(
                torch.equal(own[k].cpu(), theirs[k]) for k in own
            )
            continue
        theirs = unflatten_state(source.weights, prefix)
        own = module.state_dict()
        references = frozen.within(source.references, prefix)
        if references:  # the same frozen part, from the same source: the model built it already
            mine = frozen.frozen_parts(module)
            same = {k: v for k, v in references.items() if mine.get(k, {}).get("sha256") == v["sha256"]}
            theirs = frozen.fill_referenced(module, theirs, same)
        state = {}
        # a component that reads the source's config may lay out a tensor of the same shape
        # anew (class_label: the source's null row elsewhere); asked once per component
        relayout = _reads_options(module)
        for name, mine_tensor in own.items():
            if name not in theirs:
                result.new.append(name)
                continue
            value = theirs[name]
            if tuple(value.shape) == tuple(mine_tensor.shape):
                moved = _adapt(module, name, value, mine_tensor, source, prefix) if relayout else None  # None: as it is
                state[name] = value if moved is None or moved.shape != mine_tensor.shape else moved
                result.loaded.append(name)
                continue
            where = f"{prefix}.{name}"
            if strict:
                raise TrainingError(
                    f"trainer.init_from={source.path}: {where} is {_shape(value)} there but "
                    f"{_shape(mine_tensor)} in the model built from the config; set "
                    "trainer.init_strict=false to keep what fits and initialise the rest"
                )
            adapted = _adapt(module, name, value, mine_tensor, source, prefix)
            if adapted is not None and tuple(adapted.shape) == tuple(mine_tensor.shape):
                state[name] = adapted
                result.resized.append(f"{name} {_shape(value)}->{_shape(mine_tensor)}")
            else:
                result.skipped.append(f"{name} {_shape(value)} vs {_shape(mine_tensor)}")
        result.skipped += [f"{name} (not in the model)" for name in theirs if name not in own]
        describe = getattr(module, "init_from_note", None)  # what the component made of the source, in words
        if relayout and callable(describe) and result.loaded + result.resized:
            note = describe(source.options(prefix))
            if note:
                result.notes.append(str(note))
        if state:
            with torch.no_grad():
                for name, value in state.items():
                    own[name].copy_(value.to(own[name].dtype))
    return results


def report(source: InitSource, results: list[ComponentLoad], notes: list[str]) -> str:
    """The load report, one block: where from, each component, then ``notes``."""
    lines = [f"trainer.init_from={source.path}: {source.what}"]
    lines += [r.line() for r in results]
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


def initialize(trainer: Any, modules: Mapping[str, nn.Module]) -> tuple[InitSource, list[ComponentLoad]] | None:
    """``trainer.init_from`` for a trainer's fresh run: read the source and load it into
    ``modules`` (their own ``checkpoint:`` keys win). None when the key is unset, or when the
    run resumes (its checkpoint wins; said on rank 0)."""
    options = trainer.options
    path = options.get("init_from")
    if not path:
        for key in ("init_preset", "init_config"):
            if options.get(key) is not None:
                raise TrainingError(f"trainer.{key}={options.get(key)} is set without trainer.init_from=PATH (the paper .ckpt it reads)")
        return None
    latest: Checkpoint | None = trainer.state.latest()
    if latest is not None and trainer.state.allow_resume:
        if trainer.is_main:
            print(
                f"ldmkit train {trainer.stage}: trainer.init_from={path} not applied: resuming from "
                f"{latest.path} (its weights win)",
                file=sys.stderr,
            )
        return None
    source = read_source(path, stage=trainer.stage, preset=options.get("init_preset"), config=options.get("init_config"))
    keep = {}
    for prefix in modules:
        node = trainer.cfg.get(prefix)
        if hasattr(node, "get") and node.get("checkpoint") is not None:
            keep[prefix] = f"{prefix}.checkpoint={node.get('checkpoint')}"
    results = load_components(modules, source, strict=bool(options.get("init_strict", True)), keep=keep)
    tried = [r for r in results if not r.kept]
    if tried and not any(r.loaded or r.resized for r in tried):
        found = "; ".join(f"{r.name}: {len(r.new)} new, {len(r.skipped)} skipped" for r in tried)
        raise TrainingError(
            f"trainer.init_from={source.path} ({source.what}) holds none of the tensors of the model built from "
            f"the config ({found}): is it a run of another stage, or of another architecture? "
            f"(stage={trainer.stage} here; trainer.init_architecture=source builds the source's)"
        )
    return source, results


def print_report(trainer: Any, source: InitSource, results: list[ComponentLoad], notes: list[str]) -> None:
    if trainer.is_main:
        print(f"ldmkit train {trainer.stage}: " + report(source, results, notes), file=sys.stderr)


# -- the architecture from the source --------------------------------------------------------
#: the config groups that describe the model a stage trains (taken from the source with
#: ``trainer.init_architecture=source``)
ARCHITECTURE_GROUPS = {"ldm": ("first_stage", "denoiser", "conditioner", "schedule"), "autoencoder": ("first_stage",)}


def source_config(
    path: str | Path, *, stage: str, preset: str | None = None, config: str | Path | None = None
) -> Any:
    """The config (a ``DictConfig``) of the model at ``path``, a source of ``trainer.init_from``:
    a pipeline folder's or a run's ``config.yaml``, a paper checkpoint's translation, a
    diffusers folder's."""
    from ldmkit import pipeline_files

    path = _existing(path, preset, config)
    with _reading(path):
        if path.is_file():
            from ldmkit.interop import compvis

            _check_translation(path, preset, config)
            return compvis.compose(compvis.translation(config, preset))
        if (path / "model_index.json").is_file():
            from ldmkit.interop import diffusers_format

            return diffusers_format.read_diffusers(path)[0]
        candidates = [path / "pipeline" / "config.yaml"] if stage == "ldm" else []
        candidates += [path / "config.yaml"]
        if (path / "checkpoints").is_dir() and not (path / "config.yaml").is_file():
            candidates.append(resolve_checkpoint(path).path / "config.yaml")
        for candidate in candidates:
            if candidate.is_file():  # a pipeline folder's carried files named inside it
                return pipeline_files.resolve(_saved_config(candidate), candidate.parent)
    raise _missing(path, "holds no config.yaml to take the architecture from")


def _resumed_config(cfg: Any) -> Any:
    """The config of the run that ``cfg`` resumes (its newest checkpoint's ``config.yaml``, which
    holds the architecture taken when it started), None for a fresh run: a run that resumes
    reads no source, which may have moved since."""
    from ldmkit.checkpoint_layout import list_checkpoints

    if not (cfg.get("trainer") or {}).get("resume", True) or not cfg.get("run_dir"):
        return None
    saved = [c.config_file for c in list_checkpoints(Path(str(cfg.run_dir)) / "checkpoints") if c.config_file.is_file()]
    return _saved_config(saved[-1]) if saved else None


def inside_architecture(override: str) -> bool:
    """Whether a command-line override sets a key inside one of the model's groups
    (``conditioner.num_classes=10``, not ``conditioner=class_label``)."""
    key = override.lstrip("+~").split("=", 1)[0]
    return "." in key and key.split(".", 1)[0] in ARCHITECTURE_GROUPS["ldm"]


def compose_training_config(overrides: Sequence[str] = (), *, config_dirs: Sequence[str | Path] = ()) -> Any:
    """:func:`ldmkit.config.compose_config` of ``overrides``, and with
    ``trainer.init_architecture=source`` (in ``overrides`` or a config file) the model of
    ``trainer.init_from`` (:func:`adopt_source_architecture`) with the ``overrides`` of keys inside
    its groups set on it (composed without them first: the config's own groups may lack them).
    What ``ldmkit train`` composes; :func:`ldmkit.training.train` takes the source's model itself
    for a config that ``compose_config`` composed, but without the keys set inside its groups."""
    from ldmkit.config import compose_config

    def takes_source(cfg) -> bool:
        return (cfg.get("trainer") or {}).get("init_architecture") == "source"

    kept = [o for o in overrides if not inside_architecture(o)]
    if not any(o.lstrip("+") == "trainer.init_architecture=source" for o in overrides):
        try:
            cfg = compose_config(overrides, config_dirs=config_dirs)
        except LdmkitError:
            if len(kept) == len(overrides) or not takes_source(compose_config(kept, config_dirs=config_dirs)):
                raise
        else:
            if not takes_source(cfg):
                return cfg
            if len(kept) == len(overrides):  # nothing inside the model's groups: cfg is the base
                return adopt_source_architecture(cfg, overrides)
    return adopt_source_architecture(compose_config(kept, config_dirs=config_dirs), overrides)


def adopt_source_architecture(cfg: Any, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``trainer.init_architecture=source``: ``cfg`` with the model's groups (the first stage,
    denoiser, conditioner and noise schedule; stage 1: the first stage) taken from
    ``trainer.init_from``'s own config, then the ``overrides`` of keys inside those groups
    applied again (``conditioner.num_classes=10`` still changes the class count, and drops the
    source's ``class_names`` of another count unless they are given too). A group
    chosen on the command line (``conditioner=class_label``) stays the one chosen. Components'
    ``checkpoint:`` keys are cleared: their weights come from ``init_from``. A copy of ``cfg``,
    whose ``choices.architecture`` names ``init_from``: a config that names it is returned as it
    is (taken already, the keys set since stay)."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from ldmkit.config import check_config

    trainer = cfg.get("trainer") or {}
    if trainer.get("init_architecture", "config") != "source":
        return cfg
    stage = str(cfg.get("stage", "ldm"))
    if not trainer.get("init_from"):
        raise TrainingError("trainer.init_architecture=source needs trainer.init_from=PATH (the model to take it from)")
    if OmegaConf.select(cfg, "choices.architecture", default=None) == str(trainer.init_from):
        return cfg
    cfg = copy.deepcopy(cfg)
    source = _resumed_config(cfg)
    if source is None:
        source = source_config(trainer.init_from, stage=stage, preset=trainer.get("init_preset"),
                               config=trainer.get("init_config"))  # fmt: skip
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chosen = {o.key_or_group for o in parsed if "." not in o.key_or_group and not o.is_delete()}
    taken = [g for g in ARCHITECTURE_GROUPS.get(stage, ()) if g not in chosen and g in source]
    with open_dict(cfg):
        for group in taken:
            node = OmegaConf.create(OmegaConf.to_container(source[group], resolve=True))
            if "checkpoint" in node:
                node.checkpoint = None
            cfg[group] = node
            if "choices" in cfg:  # messages name the option the group came from: the source's
                cfg.choices[group] = OmegaConf.select(source, f"choices.{group}", default=None)
        for o in parsed:
            if inside_architecture(o.input_line):  # set here: composition went without them
                if o.is_delete():
                    parent, _, key = o.key_or_group.rpartition(".")
                    node = OmegaConf.select(cfg, parent)
                    if node is not None and key in node:
                        del node[key]
                else:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), force_add=True)
        given = {o.key_or_group for o in parsed}
        names = OmegaConf.select(cfg, "conditioner.class_names", default=None)
        if ("conditioner" in taken and "conditioner.num_classes" in given and "conditioner.class_names" not in given
                and names is not None and len(names) != cfg.conditioner.num_classes):  # fmt: skip
            cfg.conditioner.class_names = None  # the source's names, of another class count
        OmegaConf.update(cfg, "choices.architecture", str(trainer.init_from), force_add=True)
    check_config(cfg)
    return cfg
