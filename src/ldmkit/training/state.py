"""The state of a training run and the crash-safe checkpoints that keep it.

:class:`TrainingState` is where a run is (step, epoch, batches into the epoch, training time).
:meth:`~TrainingState.save` writes the state after a step; :meth:`~TrainingState.resume`
loads the newest intact checkpoint, after :meth:`~TrainingState.read` parsed every file of it
and :meth:`~TrainingState.verify` compared its config with the current one.

A checkpoint is a folder ``<run_dir>/checkpoints/step_<NNNNNNNNN>/`` holding

* ``model.safetensors`` — the model's weights, keys prefixed by component
  (``first_stage.encoder.conv_in.weight``: the layout :class:`ldmkit.pipeline.Pipeline` uses);
* ``training.safetensors`` — tensors only training needs (e.g. the discriminator);
* ``trainer_state.pt`` — optimizer states, step, data position and RNG states (read back
  with ``torch.load(weights_only=True)``: plain containers and tensors, no code);
* ``config.yaml`` — the resolved config of the run;
* ``meta.json`` — step, file list and each file's SHA-256, written last.

Under ``trainer.strategy=fsdp`` the model, the training modules and the optimizers are sharded
across the ranks: ``sharded/`` takes the place of both safetensors files and of the optimizer
states, written by :mod:`torch.distributed.checkpoint` (each rank writes its own
``__<rank>_0.distcp`` into the temporary folder, rank 0 the ``.metadata``, then rank 0 adds the
other files and renames the folder as above). ``meta.json`` lists and checksums those files
too. A run with another number of ranks reads them resharded (:mod:`ldmkit.training.fsdp`).

The folder is assembled under a temporary name, every file fsynced, then renamed into place
with ``os.replace`` (atomic on POSIX) and the parent directory fsynced: a run killed at any
moment leaves either the complete checkpoint or none, never a torn one. Temporary folders
of killed runs are removed on the next start. A file damaged later (disk errors, a copy cut
short, an edit) no longer matches its checksum: :meth:`CheckpointManager.usable` then skips
that checkpoint with one warning naming the file, and training resumes from an older one.
Reading the layout (:func:`validate`, :func:`resolve_checkpoint`) is
:mod:`ldmkit.checkpoint_layout`, in the core, because loading a component's weights from a
run folder needs it too; its names are re-exported here.

On resume, keys that define the model (the stage's :meth:`config_keys_that_must_match`) and
``seed`` (the random streams continue from the checkpoint) cannot change: resuming refuses,
naming them. Everything else — ``trainer.lr``, ``trainer.max_steps``, batch size, intervals,
data, the sampler of the grids — is applied from the resumed step on and listed in one
warning, so the run never keeps an old value while its ``config.yaml`` shows a new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

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
from ldmkit.config import refuse_interpolations
from ldmkit.errors import CheckpointError, first_few
from ldmkit.io import WriteError, _fsync_dir, follow_umask, process_is_gone, write_failure
from ldmkit.safetensors_io import read_safetensors
from ldmkit.training import distributed
from ldmkit.training.errors import TrainingError, TrainingWarning
from ldmkit.training.rng import global_rng_state, set_global_rng_state

__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "MODEL_FILE",
    "SHARDED_DIR",
    "STATE_FILE",
    "TRAINING_FILE",
    "Change",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointWarning",
    "StageParts",
    "TrainingState",
    "config_changes",
    "flatten_state",
    "load_state",
    "read_safetensors",
    "resolve_checkpoint",
    "skip_warning",
    "unflatten_state",
    "validate",
]

STATE_FORMAT = 2  # trainer_state.pt layout (1: one "rng" entry, data position as a batch count)
SHARDED_DIR = "sharded"  # trainer.strategy=fsdp: the torch.distributed.checkpoint files


class StageParts(Protocol):
    """What a training stage gives the state it is saved in and resumed from (a
    :class:`~ldmkit.training.engine.Trainer` is one; its docstrings say what each is)."""

    stage: str

    def model_modules(self) -> dict[str, nn.Module]: ...
    def training_modules(self) -> dict[str, nn.Module]: ...
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...
    def generators(self) -> dict[str, torch.Generator]: ...
    def hyperparameters(self) -> dict[str, dict[str, Any]]: ...
    def config_keys_that_must_match(self) -> list[str]: ...
    def config_keys_kept_from_checkpoint(self) -> list[str]: ...
    def sharded_state(self) -> dict[str, Any] | None: ...
    def load_sharded_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class Contents:
    """Every file of one checkpoint, read and parsed (nothing applied yet)."""

    state: dict[str, Any]
    weights: dict[str, Tensor]
    extra: dict[str, Tensor]
    config: dict[str, Any] | None
    frozen: dict[str, dict[str, Any]]


class TrainingState:
    """Where the run of one stage in ``run_dir`` is, and its checkpoints.

    ``step`` counts the optimization steps done, ``epoch`` and ``batches_in_epoch`` the data
    read (:class:`ldmkit.training.data.TrainBatches` keeps them), ``train_seconds`` the time
    spent in steps. After a resume, ``data_position`` holds this rank's saved data position
    until the data takes it. Only rank 0 writes; every rank's random streams and data position
    go into its checkpoints.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        *,
        scaler: Any,
        keep_last: int,
        resume: bool = True,
        embed_frozen: bool = False,
    ) -> None:
        self.run_dir, self.cfg, self.scaler = Path(run_dir), cfg, scaler
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=keep_last)
        self.allow_resume, self.embed_frozen = bool(resume), bool(embed_frozen)
        self.rank, self.world_size = distributed.distributed_info()
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0
        self.data_position: dict[str, Any] | None = None

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (not verified against its checksums)."""
        return self.checkpoints.latest()

    # -- saving ---------------------------------------------------------------------------
    def save(self, stage: StageParts, data_position: dict[str, Any]) -> Checkpoint | None:
        """Write the checkpoint of the current step (rank 0; the others hand it their random
        streams and ``data_position``). Returns it on rank 0."""
        ranks = distributed.gather(
            {
                "rng": global_rng_state(),
                "generators": {k: g.get_state() for k, g in stage.generators().items()},
                "data": data_position,
            }
        )
        sharded = stage.sharded_state()
        if sharded is not None:  # every rank writes its shards
            checkpoint = self._write(stage, ranks, sharded)
        else:
            checkpoint = self._write(stage, ranks) if self.rank == 0 else None
        distributed.barrier()
        return checkpoint

    def _write(
        self, stage: StageParts, ranks: list[dict[str, Any]], sharded: dict[str, Any] | None = None
    ) -> Checkpoint | None:
        optimizers = stage.optimizers() if sharded is None else {}  # else in the shards
        state = {
            "format": STATE_FORMAT,
            "stage": stage.stage,
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "train_seconds": self.train_seconds,
            "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
            "sharded": sharded is not None,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "world_size": self.world_size,
            "ranks": ranks,
        }
        if sharded is not None:
            return self.checkpoints.save(
                self.step, state=state, config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True), sharded=sharded
            )
        parts = self._frozen_references(stage)
        return self.checkpoints.save(
            self.step,
            model=flatten_state(stage.model_modules(), skip=parts),
            training=flatten_state(stage.training_modules()) or None,
            state=state,
            config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
            frozen_parts=parts,
        )

    def _frozen_references(self, stage: StageParts) -> dict[str, dict[str, Any]]:
        """The frozen pretrained parts of the model modules kept by reference
        (``{"conditioner.encoder": {"source", "sha256"}}``; :mod:`ldmkit.frozen`), none when
        ``trainer.embed_frozen`` is true."""
        if self.embed_frozen:
            return {}
        return {
            f"{prefix}.{name}": reference
            for prefix, module in stage.model_modules().items()
            for name, reference in frozen.frozen_parts(module).items()
        }

    # -- resuming -------------------------------------------------------------------------
    def resume(self, stage: StageParts) -> Checkpoint | None:
        """Load the newest checkpoint whose files are all intact; each damaged one is skipped
        with one warning naming its bad file. Returns what was loaded (None: a fresh run)."""
        if self.rank == 0:
            self.checkpoints.remove_incomplete()
        distributed.barrier()
        try:
            found, problem = self._usable(stage), None
        except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below
            found, problem = None, err
        self._agree(found, problem)
        if found is None:
            return None
        checkpoint, contents = found
        self.load(checkpoint, contents, stage)
        return checkpoint

    def _usable(self, stage: StageParts) -> tuple[Checkpoint, Contents] | None:
        """The newest checkpoint this rank can read and resume from, read (not applied)."""
        for checkpoint in self.checkpoints.usable(verify=True):
            if not self.allow_resume:
                raise TrainingError(
                    f"run_dir {self.run_dir} already holds checkpoints (latest: {checkpoint.path}) and "
                    f"trainer.resume=false; choose another run_dir or delete that one"
                )
            try:
                contents = self.read(checkpoint, stage)
            except CheckpointError as err:
                skip_warning(checkpoint, str(err))
                continue
            self.verify(checkpoint, contents.config, stage)
            return checkpoint, contents
        return None

    def _agree(self, found: tuple[Checkpoint, Contents] | None, problem: Exception | None) -> None:
        """Raise on every rank unless every rank resumes from the same step (or none starts
        from one). A ``run_dir`` local to each machine lets rank 0 find its checkpoints while
        the others find none; resuming anyway would train the ranks from different steps
        (and with sharded checkpoints wait forever in a collective load)."""
        choice = None if found is None else (found[0].step, str(found[0].path))
        why = None if problem is None else str(problem) or type(problem).__name__
        choices = distributed.gather((choice, why))
        if problem is not None:
            raise problem
        failed = [(rank, reason) for rank, (_, reason) in enumerate(choices) if reason is not None]
        if failed:
            rank, reason = failed[0]
            raise TrainingError(f"rank {rank} cannot resume: {reason}")
        if len({None if pick is None else pick[0] for pick, _ in choices}) > 1:
            groups: dict[str, list[int]] = {}
            for rank, (pick, _) in enumerate(choices):
                groups.setdefault("none" if pick is None else f"step {pick[0]} ({pick[1]})", []).append(rank)
            found_text = ", ".join(f"{what} on {_ranks_text(ranks)}" for what, ranks in groups.items())
            raise TrainingError(
                f"the ranks found different checkpoints to resume from: {found_text}; run_dir must be "
                "on storage every machine sees at the same path (docs/distributed.md)"
            )

    def read(self, checkpoint: Checkpoint, stage: StageParts) -> Contents:
        """Every file of ``checkpoint``, read and parsed before anything is applied (a bad
        file raises :class:`CheckpointError` naming it, with the stage untouched)."""
        state = load_state(checkpoint)
        if state.get("stage") != stage.stage:
            raise TrainingError(
                f"{checkpoint.path} is a checkpoint of stage {state.get('stage')!r}, not "
                f"{stage.stage!r}; use another run_dir"
            )
        for key in ("step", "epoch", "batches_in_epoch", "train_seconds", "optimizers"):
            if key not in state:
                raise CheckpointError(f"{checkpoint.path / STATE_FILE} has no {key!r} entry")
        sharded = bool(state.get("sharded"))  # then sharded/ holds them (load() reads it)
        weights = {} if sharded else read_safetensors(checkpoint.model_file)
        extra = (
            read_safetensors(checkpoint.path / TRAINING_FILE)
            if stage.training_modules() and not sharded
            else {}
        )
        saved_config = None
        if checkpoint.config_file.is_file():
            try:
                saved_config = OmegaConf.to_container(
                    OmegaConf.load(checkpoint.config_file), resolve=False
                )
            except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise many types
                raise CheckpointError(
                    f"cannot read {checkpoint.config_file}: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(saved_config, dict):
                raise CheckpointError(f"cannot read {checkpoint.config_file}: not a mapping")
            refuse_interpolations(saved_config, checkpoint.config_file)  # refused, not skipped
        try:
            references = frozen.read_manifest(checkpoint.path)
        except frozen.FrozenReferenceError as err:
            raise CheckpointError(str(err)) from err
        for prefix, module in stage.model_modules().items():  # a changed source: one clear error
            frozen.check_referenced(
                module, frozen.within(references, prefix), checkpoint.path, prefix
            )
        return Contents(state, weights, extra, saved_config, references)

    def verify(
        self, checkpoint: Checkpoint, saved: Mapping[str, Any] | None, stage: StageParts
    ) -> None:
        """Refuse config changes the checkpoint cannot take; report (and apply) the others."""
        if saved is None:
            return
        current = OmegaConf.to_container(self.cfg, resolve=True)
        fixed = [*stage.config_keys_that_must_match(), "seed"]
        changes = config_changes(saved, current)  # the saved config was written resolved
        # a file option recorded as typed by runs before ldmkit recorded it absolute
        changes = [c for c in changes if not _now_absolute(c)]
        refused = [c for c in changes if under(c.key, fixed) and not weights_only_key(c.key)]
        if refused:
            listed = "; ".join(str(c) for c in refused)
            raise TrainingError(
                f"cannot resume run_dir {self.run_dir} (checkpoint {checkpoint.path.name}) with a different "
                f"model: {listed}; {', '.join(fixed)} cannot change on resume (lr, max_steps and the other "
                f"trainer settings can): restore those values, or start a new run_dir"
            )
        if changes:
            kept = stage.config_keys_kept_from_checkpoint()
            listed = "; ".join(
                f"{c} (ignored: the weights come from the checkpoint)"
                if weights_only_key(c.key)
                else f"{c} (ignored: the checkpoint's value is kept)"
                if under(c.key, kept)
                else str(c)
                for c in changes
            )
            warnings.warn(
                f"resuming {self.run_dir} at step {checkpoint.step} with {len(changes)} changed "
                f"setting(s), applied from here on: {listed}",
                TrainingWarning,
                stacklevel=4,
            )

    def load(self, checkpoint: Checkpoint, contents: Contents, stage: StageParts) -> None:
        """Apply what :meth:`read` returned: weights, optimizers, position, random streams."""
        state = contents.state
        target = stage.sharded_state()
        if bool(state.get("sharded")) != (target is not None):
            written, running = ("fsdp", "ddp") if state.get("sharded") else ("ddp", "fsdp")
            raise TrainingError(
                f"checkpoint {checkpoint.path} was written with trainer.strategy={written}, this run "
                f"has trainer.strategy={running}: resume it with trainer.strategy={written}"
            )
        if target is not None:
            _load_sharded(checkpoint, target)
            stage.load_sharded_state(target)
        else:
            for prefix, module in stage.model_modules().items():
                tensors = frozen.fill_referenced(  # checked by read()
                    module,
                    unflatten_state(contents.weights, prefix),
                    frozen.within(contents.frozen, prefix),
                )
                _load_module(module, tensors, checkpoint.model_file, prefix)
            for prefix, module in stage.training_modules().items():
                _load_module(
                    module, unflatten_state(contents.extra, prefix), checkpoint.path, prefix
                )
        for key, optimizer in stage.optimizers().items():
            if target is None:
                try:
                    optimizer.load_state_dict(state["optimizers"][key])
                except ValueError as err:  # torch: "... doesn't match the size of optimizer's group"
                    raise _other_parameters(checkpoint.path, f"the {key} optimizer's state") from err
            for group in optimizer.param_groups:
                group.update(stage.hyperparameters().get(key, {}))
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.train_seconds = float(state["train_seconds"])
        mine = self._saved_rank_state(state)
        set_global_rng_state(mine["rng"])
        for name, gen in stage.generators().items():
            if name in mine.get("generators", {}):
                gen.set_state(mine["generators"][name])
        self.data_position = mine.get("data") or {"loader": None}

    def _saved_rank_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if "ranks" not in state:  # format 1
            return {"rng": state["rng"], "generators": {}, "data": {"loader": None}}
        ranks = list(state["ranks"])
        if len(ranks) != self.world_size:
            warnings.warn(
                f"the checkpoint was written by {len(ranks)} rank(s), this run has {self.world_size}: "
                f"random streams and data positions cannot be restored exactly"
                + ("; the sharded weights and optimizer states are resharded" if state.get("sharded") else ""),
                TrainingWarning,
                stacklevel=4,
            )
            return {**ranks[0], "data": {"loader": None}}
        return ranks[self.rank]


def _load_sharded(checkpoint: Checkpoint, target: dict[str, Any]) -> None:
    """Fill ``target`` (a stage's sharded state) in place from ``checkpoint``'s shards,
    resharded when the checkpoint was written by another number of ranks."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(target, checkpoint_id=checkpoint.path / SHARDED_DIR)
    except Exception as err:  # noqa: BLE001 - DCP wraps every rank's failure
        raise TrainingError(
            f"checkpoint {checkpoint.path / SHARDED_DIR} does not fit the model built from the "
            f"current config (was the config changed since the run started?): {_one_line(err)}"
        ) from err


def _other_parameters(checkpoint: Path, what: str, detail: str = "") -> TrainingError:
    """A checkpoint whose ``what`` (an optimizer's state, the EMA averages) is of other
    parameters than the run trains: the keys that change them, and how to go on."""
    return TrainingError(
        f"checkpoint {checkpoint} holds {what} for other parameters than this run trains{detail} (did "
        f"trainer.trainable / trainer.frozen change since the run started?); restore them, or start a new "
        f"run from its weights: trainer.init_from={checkpoint} run_dir=<a new folder>"
    )


def _load_module(module: nn.Module, tensors: dict[str, Tensor], source: Path, prefix: str) -> None:
    untrained, unaveraged = _averages_that_differ(module, tensors)
    checkpoint = source if source.is_dir() else source.parent
    if unaveraged:  # frozen when the run started, trained now
        raise _other_parameters(checkpoint, "the EMA averages", f": none of {first_few(unaveraged)}")
    if untrained:  # e.g. bert's to_logits, trained by runs before ldmkit froze it
        listed = first_few(untrained)
        raise TrainingError(
            f"checkpoint {checkpoint} was written while {listed} were trained (its EMA averages "
            f"them), and the model built now keeps them frozen (did trainer.trainable / trainer.frozen change "
            f"since the run started? or their component freezes them now), so the run cannot resume exactly; "
            f"start a new run from its weights: trainer.init_from={checkpoint} run_dir=<a new folder>"
        )
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # torch's message lists every tensor, over several lines
        own = module.state_dict()
        missing, unexpected = [k for k in own if k not in tensors], [k for k in tensors if k not in own]
        what = "; ".join(
            [f"missing {first_few(missing)}"] * bool(missing) + [f"unexpected {first_few(unexpected)}"] * bool(unexpected)
        ) or _one_line(err)
        raise TrainingError(
            f"checkpoint {source} does not fit the {prefix} built from the current config "
            f"(was the config changed since the run started?): {what}"
        ) from err


# -- what changed in the config --------------------------------------------------------------
_ABSENT = "<absent>"


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.before)} -> {_show(self.after)}"


def _show(value: Any) -> str:
    return value if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values; an empty mapping is a value)."""
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs (or that exists on one side only), sorted."""
    before, after = flatten(saved), flatten(current)
    keys = sorted(set(before) | set(after))
    return [
        Change(k, before.get(k, _ABSENT), after.get(k, _ABSENT))
        for k in keys
        if before.get(k, _ABSENT) != after.get(k, _ABSENT)
    ]


def _now_absolute(change: Change) -> bool:
    """``vocab: 'myvocab.txt' -> '/work/myvocab.txt'``: the same file, named from here."""
    before, after = change.before, change.after
    return (isinstance(before, str) and isinstance(after, str) and bool(before)
            and not os.path.isabs(before) and os.path.abspath(os.path.expanduser(before)) == after)  # fmt: skip


def under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def weights_only_key(key: str) -> bool:
    """``first_stage.checkpoint`` and the like: initial weights, which a resumed run takes
    from its own checkpoint instead."""
    return key.rsplit(".", 1)[-1] == "checkpoint"


# -- checkpoint folders ------------------------------------------------------------------------
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
        model: dict[str, Tensor] | None = None,
        training: dict[str, Tensor] | None = None,
        state: dict[str, Any] | None = None,
        config_yaml: str | None = None,
        frozen_parts: dict[str, dict[str, Any]] | None = None,
        sharded: dict[str, Any] | None = None,
    ) -> Checkpoint | None:
        """Write the checkpoint of ``step``. ``frozen_parts`` (``{prefix: reference}``, see
        :mod:`ldmkit.frozen`) are the parts left out of ``model``; they go to ``frozen.json``.
        ``sharded`` (instead of ``model``): a state of sharded tensors that every rank calls
        this with, written into ``sharded/`` by :mod:`torch.distributed.checkpoint`; rank 0
        writes the rest and returns the checkpoint, the other ranks None.
        A read-only or full disk raises
        :class:`~ldmkit.io.WriteError` naming the checkpoint; the ones before stay intact."""
        final = self.directory / f"step_{step:09d}"
        try:
            return self._save(
                step,
                final,
                model=model,
                training=training,
                state=state,
                config_yaml=config_yaml,
                frozen_parts=frozen_parts,
                sharded=sharded,
            )
        except Exception as err:
            tmp = self.directory / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
            code = write_failure(err, tmp)
            if code is None:
                raise
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # give a full disk back what the partial files took
            intact = [c.path.name for c in self.list() if c.step != step]
            note = (
                f"the checkpoints before it are intact (newest: {intact[-1]})" if intact else None
            )
            raise WriteError(final, code, note) from err

    def _save(
        self,
        step: int,
        final: Path,
        *,
        model: dict[str, Tensor] | None,
        training: dict[str, Tensor] | None,
        state: dict[str, Any] | None,
        config_yaml: str | None,
        frozen_parts: dict[str, dict[str, Any]] | None = None,
        sharded: dict[str, Any] | None = None,
    ) -> Checkpoint | None:
        from safetensors.torch import save_file

        main = sharded is None or distributed.distributed_info()[0] == 0
        tmp = self.directory / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
        if main:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if sharded is not None:  # rank 0's folder: the ranks share the file system
            import torch.distributed.checkpoint as dcp

            tmp = Path(distributed.broadcast_object(str(tmp)))
            dcp.save(sharded, checkpoint_id=tmp / SHARDED_DIR)  # returns once .metadata is written
            if not main:
                return None
            files = [f"{SHARDED_DIR}/{p.name}" for p in sorted((tmp / SHARDED_DIR).iterdir())]
        else:
            assert model is not None, "a checkpoint needs the model's weights or its shards"
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
            (tmp / frozen.FROZEN_FILE).write_text(
                frozen.write_manifest(frozen_parts), encoding="utf-8"
            )
            files.append(frozen.FROZEN_FILE)
        for name in files:
            follow_umask(tmp / name)  # safetensors writes 0600
            _fsync_file(tmp / name)
        if sharded is not None:
            _fsync_dir(tmp / SHARDED_DIR)
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
        self.prune(step)
        return Checkpoint(step, final)

    def prune(self, step: int | None = None) -> None:
        """Keep the newest ``keep_last`` checkpoints (up to ``step``, the one just written:
        later ones are what a run resumed before them left, unusable, and stay until a rerun
        of their step replaces them; counting them would delete the checkpoint just written).

        A folder is first renamed to a temporary name (atomically), then deleted: a kill
        during the deletion leaves a temporary folder, never a half-deleted checkpoint."""
        upto = [c for c in self.list() if step is None or c.step <= step]
        for checkpoint in upto[: -self.keep_last]:
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
                if path.name.startswith(_TMP_PREFIX) and (
                    writer is None or process_is_gone(int(writer[1]))
                ):
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
    """``trainer_state.pt`` of ``checkpoint`` (plain containers and tensors, no code runs)."""
    path = checkpoint.path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has no {STATE_FILE}: it cannot resume training"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"cannot read {path}: {_one_line(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"cannot read {path}: it holds a {type(state).__name__}, not the trainer state"
        )
    return state


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _ranks_text(ranks: list[int]) -> str:
    """``rank 3`` / ``ranks 0-3, 8`` (ascending ranks)."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


def _averages_that_differ(module: nn.Module, tensors: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
    """The parameters an EMA checkpoint averages that ``module`` (an :class:`~ldmkit.ema.EMA`)
    no longer tracks, and those it tracks that the checkpoint does not average, as the model
    names them; empty for anything else."""
    from ldmkit.ema import EMA

    if not isinstance(module, EMA):
        return [], []
    saved = [k.removeprefix("shadow.") for k in tensors if k.startswith("shadow.")]
    tracked = {EMA._key(name): name for name in module.names}
    untracked = [k.replace("__", ".") for k in saved if k not in tracked]
    return untracked, [name for key, name in tracked.items() if key not in set(saved)]
