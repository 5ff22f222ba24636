"""The training engine both stages share: run folder, resume, the step loop, time limit,
validation, image grids, logs, progress bar and checkpoints. A stage subclasses
:class:`Trainer` and supplies its models, optimizers and the body of one step."""

from __future__ import annotations

import abc
import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ldmkit import devices, frozen
from ldmkit import precision as _precision
from ldmkit.config import refuse_interpolations
from ldmkit.errors import LdmkitError
from ldmkit.io import (
    atomic_write_text,
    check_folder,
    remove_stale_temporaries,
    reporting_write_errors,
)
from ldmkit.training.checkpoint import (
    TRAINING_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    flatten_state,
    load_state,
    read_safetensors,
    skip_warning,
    unflatten_state,
)
from ldmkit.training.defaults import trainer_preset
from ldmkit.training.logger import RunLogger, to_float
from ldmkit.training.resume import config_changes, under, weights_only_key
from ldmkit.training.rng import (
    global_rng_state,
    isolated_rng,
    seed_everything,
    set_global_rng_state,
    stream_seed,
)
from ldmkit.training.run_lock import RunLock
from ldmkit.training.signals import SignalWatch, TrainingInterrupted
from ldmkit.training.threads import apply_num_threads

# (split, epoch) -> an iterable of batch dicts; lets tests and notebooks train on
# in-memory data instead of the configured dataset
DataFactory = Callable[[str, int], Iterable[Mapping[str, Any]]]

# the keys both stages share and their defaults: conf/trainer/default.yaml, the one home of
# every trainer default (ldmkit.training.defaults)
TRAINER_DEFAULTS: dict[str, Any] = trainer_preset("default")

STATE_FORMAT = 2  # trainer_state.pt layout (1: one "rng" entry, data position as a batch count)


class TrainingError(LdmkitError, RuntimeError):
    """Training cannot start or continue (the run folder is left as it was)."""


class TrainingDivergedError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is untouched."""


class TrainingWarning(UserWarning):
    """Something about a resumed run the user should know (changed settings, an inexact data
    position); ``ldmkit train`` prints each in one line."""


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str | None, key: str = "trainer.device") -> torch.device:
    """``trainer.device`` (or ``key``) as a device of this machine (:mod:`ldmkit.devices`)."""
    return devices.resolve_device(name, key)


def trainer_options(cfg: DictConfig, preset: str = "default") -> dict[str, Any]:
    """``cfg.trainer`` over the trainer preset ``conf/trainer/<preset>.yaml`` (a missing key
    takes the preset's value)."""
    node = cfg.get("trainer")
    options = trainer_preset(preset)
    if node is not None:
        options.update(OmegaConf.to_container(node, resolve=True))
    return options


class Trainer(abc.ABC):
    """One training run of one stage, in ``cfg.run_dir``.

    Subclasses implement :meth:`build`, :meth:`model_modules`, :meth:`optimizers`,
    :meth:`training_step`; optionally :meth:`training_modules`, :meth:`generators`,
    :meth:`hyperparameters`, :meth:`validate` and :meth:`save_images`. :meth:`fit` runs (or
    resumes) the loop and returns the run folder.

    Exact resume: a checkpoint holds the state after a step — weights, optimizers, the global
    random generators and the stage's own :meth:`generators`, and the data loader's position
    (``state_dict()`` of a resumable loader, else the number of batches of the epoch, replayed
    on resume). Grids and validation run on generators seeded from the run's seed, apart from
    the training streams, so neither how often they run nor where a run was stopped changes
    the weights.
    """

    stage: str = "?"
    #: the trainer preset (conf/trainer/<name>.yaml) whose values fill keys a config leaves out
    default_preset: str = "default"

    def __init__(self, cfg: DictConfig, *, data: DataFactory | None = None) -> None:
        self.cfg = cfg
        self.options = trainer_options(cfg, self.default_preset)
        self.run_dir = Path(cfg.get("run_dir") or f"runs/{self.stage}")
        check_folder(self.run_dir, f"run_dir={self.run_dir}")  # before anything is built
        self.rank, self.world_size = distributed_info()
        self.is_main = self.rank == 0  # only rank 0 writes checkpoints, logs and images
        self.device = resolve_device(self.options["device"])
        self.precision = self._resolve_precision()
        self.scaler = _precision.grad_scaler(self.precision, self.device)
        self.data = data
        self.seed = int(cfg.get("seed", 0))
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0
        self.signals = SignalWatch(enabled=False)
        self._val_batches: list[Mapping[str, Any]] | None = None
        self._train_loader: Any = None
        self._loader_in_use: Any = None  # the resumable loader of the current epoch, if any
        self._data_restore: dict[str, Any] | None = None  # this rank's saved data position

    def _resolve_precision(self) -> str:
        """``trainer.precision`` resolved for this device; the run's config records the
        resolved value (so a resume on a machine that resolves ``auto`` differently lists the
        change), and the choice is printed once."""
        requested = self.options.get("precision", "auto")
        try:
            resolved = _precision.resolve(_precision.check(requested, key="trainer.precision"), self.device)
        except _precision.PrecisionError as err:
            raise TrainingError(str(err)) from err
        self.precision_note = _precision.reason(requested, resolved, self.device)
        if self.cfg.get("trainer") is not None:
            with open_dict(self.cfg):
                self.cfg.trainer.precision = resolved
        self.options["precision"] = resolved
        return resolved

    def autocast(self):
        """The forward's precision context (:mod:`ldmkit.precision`): wrap the networks'
        forward in it and compute the loss on float32 outputs."""
        return _precision.autocast(self.precision, self.device)

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> Tensor | None:
        """``zero_grad``, backward (loss-scaled under fp16), the optional ``trainer.grad_clip``
        of ``params`` (on unscaled gradients) and the optimizer step; returns the gradient norm
        when clipping. The engine updates the loss scale once per training step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if self.options.get("grad_clip"):
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]],
                float(self.options["grad_clip"]),
            )
        self.scaler.step(optimizer)
        return norm

    # -- what a stage provides ------------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> None:
        """Create models, losses and optimizers (on :attr:`device`)."""

    @abc.abstractmethod
    def model_modules(self) -> dict[str, nn.Module]:
        """Modules saved to ``model.safetensors``, keyed by prefix (``first_stage``...)."""

    def training_modules(self) -> dict[str, nn.Module]:
        """Further modules whose state resuming needs (``training.safetensors``)."""
        return {}

    @abc.abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        ...

    def generators(self) -> dict[str, torch.Generator]:
        """The stage's own random streams (one per consumer), checkpointed and restored."""
        return {}

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        """``{optimizer: {"lr": ..., ...}}`` from the current config, written into the param
        groups after a resume (an optimizer's state_dict would bring back the saved ones)."""
        return {}

    @abc.abstractmethod
    def training_step(self, batch: Mapping[str, Any], step: int) -> dict[str, Tensor]:
        """One optimization step on ``batch`` (``step`` = updates done so far); returns
        logs. Raise :class:`TrainingDivergedError` (see :meth:`check_finite`) on NaN/Inf."""

    def validate(self, batches: list[Mapping[str, Any]]) -> dict[str, float]:
        return {}

    def save_images(self, batch: Mapping[str, Any], path: Path) -> Tensor | None:
        """Write an image grid for ``batch`` to ``path``; return it (C×H×W in [0, 1])."""
        return None

    # -- data -----------------------------------------------------------------------------
    def make_loader(self, split: str, epoch: int) -> Iterable[Mapping[str, Any]]:
        """Batches of ``split`` for ``epoch``: the ``data`` factory's, else a
        :class:`ldmkit.data.ShardLoader` (resumable) over the configured dataset."""
        if self.data is not None:
            return self.data(split, epoch)
        from ldmkit.data import build_dataloader

        loader = build_dataloader(
            self.cfg.data,
            batch_size=int(self.options["batch_size"]),
            split=split,
            num_workers=int(self.options["num_workers"]),
            seed=self.seed,
        )
        loader.epoch = epoch
        return loader

    def train_loader(self, epoch: int) -> Iterable[Mapping[str, Any]]:
        """The train split for ``epoch``. A resumable loader (``state_dict`` /
        ``load_state_dict``, an ``epoch`` attribute) is made once and reused for every epoch;
        anything else is asked for anew each epoch (and replayed on resume)."""
        if self._train_loader is not None:
            self._train_loader.epoch = epoch
            return self._train_loader
        loader = self.make_loader("train", epoch)
        if _is_resumable(loader) and hasattr(loader, "epoch"):
            self._train_loader = loader
        return loader

    def _train_batches(self) -> Iterator[Mapping[str, Any]]:
        restore, self._data_restore = self._data_restore, None
        while True:
            loader = self.train_loader(self.epoch)
            resumable = _is_resumable(loader)
            self._loader_in_use = loader if resumable else None
            skip = 0
            if restore is not None:  # the first epoch after a resume
                saved = restore.get("loader")
                if resumable and saved is not None:
                    note = loader.load_state_dict(saved)
                    if note:
                        warnings.warn(f"resuming at step {self.step}: {note}", TrainingWarning, stacklevel=2)
                        self.batches_in_epoch = 0
                else:  # replay the epoch's order up to the saved position
                    skip = self.batches_in_epoch
                restore = None
            resumed_mid_epoch = self.batches_in_epoch > 0
            produced = 0
            for index, batch in enumerate(loader):
                produced += 1
                if index < skip:
                    continue
                self.batches_in_epoch = self.batches_in_epoch + 1 if resumable else index + 1
                yield batch
            if produced == 0 and not resumed_mid_epoch:
                raise TrainingError(f"the train split of data={self._data_label()} yielded no batches")
            self.epoch += 1
            self.batches_in_epoch = 0

    def validation_batches(self) -> list[Mapping[str, Any]]:
        """The first ``val_batches`` batches of ``val_split``, loaded once and kept."""
        if self._val_batches is None:
            batches = []
            limit = int(self.options["val_batches"])
            if limit > 0 and self._has_split(str(self.options["val_split"])):
                for batch in self.make_loader(str(self.options["val_split"]), 0):
                    batches.append(batch)
                    if len(batches) >= limit:
                        break
            self._val_batches = batches
        return self._val_batches

    def _has_split(self, split: str) -> bool:
        """Whether the configured dataset has ``split``; warns once when it does not, so a
        run on data without a held-out split trains on instead of failing at validation."""
        if self.data is not None:
            return True
        from ldmkit.data.loading import data_config, load_manifest

        _, manifest = load_manifest(data_config(self.cfg.data))
        if split in manifest.splits:
            return True
        warnings.warn(
            f"trainer.val_split={split!r} is not in data={self._data_label()} (it has "
            f"{', '.join(sorted(manifest.splits))}); validation is skipped and grids use training batches. "
            f"Prepare the data with val_fraction=... or set trainer.val_split",
            stacklevel=2,
        )
        return False

    def _data_label(self) -> str:
        data = self.cfg.get("data")
        return str(data.get("source", data)) if isinstance(data, Mapping | DictConfig) else str(data)

    # -- checks ---------------------------------------------------------------------------
    def check_finite(self, name: str, value: Tensor, logs: Mapping[str, Any]) -> None:
        if not bool(torch.isfinite(value).all()):
            parts = ", ".join(f"{k}={to_float(v):.4g}" for k, v in logs.items())
            latest = self.checkpoints.latest() if hasattr(self, "checkpoints") else None
            where = f"the last good checkpoint {latest.path} is intact" if latest else "no checkpoint was written yet"
            raise TrainingDivergedError(
                f"{self.stage} training diverged: {name} is {to_float(value)} at step {self.step} "
                f"({parts}); stopped without saving, {where}. Lower trainer.lr or check the data."
            )

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_interrupt(self, during: str) -> None:
        """Raise :class:`TrainingInterrupted` if SIGTERM/SIGINT arrived (for long phases
        outside the step loop, e.g. building the latent cache)."""
        stop, _ = self.signals.poll(self.world_size)
        if stop:
            latest = self.checkpoints.latest() if hasattr(self, "checkpoints") else None
            raise TrainingInterrupted(stop, self.step, latest.path if latest else None, during=during)

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Checkpoint | None:
        ranks = self._gather(self._rank_state())
        if not self.is_main:
            self.barrier()
            return None
        checkpoint = self._write_checkpoint(ranks)
        self.barrier()
        return checkpoint

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: random streams and the data position."""
        loader = self._loader_in_use
        return {
            "rng": global_rng_state(),
            "generators": {k: g.get_state() for k, g in self.generators().items()},
            "data": {"loader": loader.state_dict() if loader is not None else None},
        }

    def _gather(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        if self.world_size == 1:
            return [state]
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def _write_checkpoint(self, ranks: list[dict[str, Any]]) -> Checkpoint:
        state = {
            "format": STATE_FORMAT,
            "stage": self.stage,
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "train_seconds": self.train_seconds,
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers().items()},
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "world_size": self.world_size,
            "ranks": ranks,
        }
        parts = self.frozen_references()
        return self.checkpoints.save(
            self.step,
            model=flatten_state(self.model_modules(), skip=parts),
            training=flatten_state(self.training_modules()) or None,
            state=state,
            config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
            frozen_parts=parts,
        )

    def frozen_references(self) -> dict[str, dict[str, Any]]:
        """The frozen pretrained parts of the model modules kept by reference in checkpoints
        (``{"conditioner.encoder": {"source", "sha256"}}``; :mod:`ldmkit.frozen`), none when
        ``trainer.embed_frozen`` is true."""
        if self.options.get("embed_frozen"):
            return {}
        return {
            f"{prefix}.{name}": reference
            for prefix, module in self.model_modules().items()
            for name, reference in frozen.frozen_parts(module).items()
        }

    def _read_checkpoint(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Every file of ``checkpoint``, read and parsed before anything is applied (a bad
        file raises :class:`CheckpointError` naming it, with the trainer untouched)."""
        state = load_state(checkpoint)
        if state.get("stage") != self.stage:
            raise TrainingError(
                f"{checkpoint.path} is a checkpoint of stage {state.get('stage')!r}, not "
                f"{self.stage!r}; use another run_dir"
            )
        for key in ("step", "epoch", "batches_in_epoch", "train_seconds", "optimizers"):
            if key not in state:
                raise CheckpointError(f"{checkpoint.path / 'trainer_state.pt'} has no {key!r} entry")
        weights = read_safetensors(checkpoint.model_file)
        extra = read_safetensors(checkpoint.path / TRAINING_FILE) if self.training_modules() else {}
        saved_config = None
        if checkpoint.config_file.is_file():
            try:
                saved_config = OmegaConf.to_container(OmegaConf.load(checkpoint.config_file), resolve=False)
            except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise many types
                raise CheckpointError(f"cannot read {checkpoint.config_file}: {type(err).__name__}: {err}") from err
            if not isinstance(saved_config, dict):
                raise CheckpointError(f"cannot read {checkpoint.config_file}: not a mapping")
            refuse_interpolations(saved_config, checkpoint.config_file)  # refused, not skipped
        try:
            references = frozen.read_manifest(checkpoint.path)
        except frozen.FrozenReferenceError as err:
            raise CheckpointError(str(err)) from err
        for prefix, module in self.model_modules().items():  # a changed source: one clear error
            frozen.check_referenced(module, frozen.within(references, prefix), checkpoint.path, prefix)
        return {"state": state, "weights": weights, "extra": extra, "config": saved_config,
                "frozen": references}

    def load_checkpoint(self, checkpoint: Checkpoint, contents: dict[str, Any] | None = None) -> None:
        contents = contents or self._read_checkpoint(checkpoint)
        state = contents["state"]
        for prefix, module in self.model_modules().items():
            tensors = frozen.fill_referenced(  # checked by _read_checkpoint
                module, unflatten_state(contents["weights"], prefix), frozen.within(contents["frozen"], prefix)
            )
            self._load_module(module, tensors, checkpoint.model_file, prefix)
        for prefix, module in self.training_modules().items():
            self._load_module(module, unflatten_state(contents["extra"], prefix), checkpoint.path, prefix)
        for key, optimizer in self.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][key])
            for group in optimizer.param_groups:
                group.update(self.hyperparameters().get(key, {}))
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.train_seconds = float(state["train_seconds"])
        mine = self._saved_rank_state(state)
        set_global_rng_state(mine["rng"])
        for name, gen in self.generators().items():
            if name in mine.get("generators", {}):
                gen.set_state(mine["generators"][name])
        self._data_restore = mine.get("data") or {"loader": None}

    def _saved_rank_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if "ranks" not in state:  # format 1
            return {"rng": state["rng"], "generators": {}, "data": {"loader": None}}
        ranks = list(state["ranks"])
        if len(ranks) != self.world_size:
            warnings.warn(
                f"the checkpoint was written by {len(ranks)} rank(s), this run has {self.world_size}: "
                f"random streams and data positions cannot be restored exactly",
                TrainingWarning, stacklevel=3,
            )
            return {**ranks[0], "data": {"loader": None}}
        return ranks[self.rank]

    def _load_module(self, module: nn.Module, tensors: dict[str, Tensor], source: Path, prefix: str) -> None:
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise TrainingError(
                f"checkpoint {source} does not fit the {prefix} built from the current config "
                f"(was the config changed since the run started?): {err}"
            ) from err

    def config_keys_that_must_match(self) -> list[str]:
        """Config keys that define the model: a resumed run refuses to change them."""
        return []

    def _check_config(self, checkpoint: Checkpoint, saved: Mapping[str, Any] | None) -> None:
        """Refuse changes the checkpoint cannot take; report (and apply) the others."""
        if saved is None:
            return
        current = OmegaConf.to_container(self.cfg, resolve=True)
        frozen = [*self.config_keys_that_must_match(), "seed"]
        changes = config_changes(saved, current)  # the saved config was written resolved
        refused = [c for c in changes if under(c.key, frozen) and not weights_only_key(c.key)]
        if refused:
            listed = "; ".join(str(c) for c in refused)
            raise TrainingError(
                f"cannot resume run_dir {self.run_dir} (checkpoint {checkpoint.path.name}) with a different "
                f"model: {listed}; {', '.join(frozen)} cannot change on resume (lr, max_steps and the other "
                f"trainer settings can): restore those values, or start a new run_dir"
            )
        if changes:
            listed = "; ".join(
                f"{c} (ignored: the weights come from the checkpoint)" if weights_only_key(c.key) else str(c)
                for c in changes
            )
            warnings.warn(
                f"resuming {self.run_dir} at step {checkpoint.step} with {len(changes)} changed "
                f"setting(s), applied from here on: {listed}",
                TrainingWarning, stacklevel=3,
            )

    def _resume(self) -> Checkpoint | None:
        """Load the newest checkpoint whose files are all intact; each damaged one is skipped
        with one warning naming its bad file. Returns what was loaded (None: a fresh run)."""
        if self.is_main:
            self.checkpoints.remove_incomplete()
        self.barrier()
        for checkpoint in self.checkpoints.usable(verify=True):
            if not self.options["resume"]:
                raise TrainingError(
                    f"run_dir {self.run_dir} already holds checkpoints (latest: {checkpoint.path}) and "
                    f"trainer.resume=false; choose another run_dir or delete that one"
                )
            try:
                contents = self._read_checkpoint(checkpoint)
            except CheckpointError as err:
                skip_warning(checkpoint, str(err))
                continue
            self._check_config(checkpoint, contents["config"])
            self.load_checkpoint(checkpoint, contents)
            return checkpoint
        return None

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to ``max_steps`` (or ``max_minutes``), resuming from ``run_dir``.

        Raises :class:`TrainingInterrupted` after SIGTERM/SIGINT (``trainer.save_on_signal``),
        once the step in progress is finished and checkpointed."""
        # half the usable cores on the CPU unless told (ldmkit.training.threads: a thread team
        # larger than the free cores runs many times slower on a shared machine)
        apply_num_threads(self.options["num_threads"], self.device)
        self.signals = SignalWatch(enabled=bool(self.options["save_on_signal"]))
        with self._run_dir_lock(), self.signals:
            return self._fit()

    @contextlib.contextmanager
    def _run_dir_lock(self) -> Iterator[None]:
        """Hold ``run_dir``'s lock (:mod:`ldmkit.training.run_lock`) for the whole run, taken
        before the model is built (a second trainer must not fill the first one's GPU).
        Rank 0 holds it for all ranks; when it is taken every rank stops with the same line."""
        lock, problem = RunLock(self.run_dir), None
        if self.is_main:
            try:
                lock.acquire()
            except LdmkitError as err:
                problem = err
        if self.world_size > 1:
            import torch.distributed as dist

            shared = [None if problem is None else str(problem)]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None and problem is None:
                problem = TrainingError(shared[0])
        if problem is not None:
            raise problem
        try:
            yield
        finally:
            lock.release()

    def _fit(self) -> Path:
        seed_everything(self.seed)
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=int(self.options["keep_checkpoints"])
        )
        if self.is_main:
            for folder in (self.run_dir, self.run_dir / "pipeline", self.run_dir / "images"):
                remove_stale_temporaries(folder)
        if self.is_main and self.options["progress"]:
            print(f"ldmkit train {self.stage}: {self.precision_note}", file=sys.stderr)
        self.build()
        self._check_image_size()
        latest = self._resume()
        if self.is_main:
            with reporting_write_errors(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))

        max_steps = int(self.options["max_steps"])
        max_seconds = (
            float(self.options["max_minutes"]) * 60.0 if self.options["max_minutes"] is not None else math.inf
        )
        every = {k: int(self.options[k] or 0) for k in ("log_every", "sample_every", "checkpoint_every", "val_every")}
        logger = RunLogger(
            self.run_dir, resume_step=self.step if latest is not None else None,
            tensorboard=bool(self.options["tensorboard"]),
        ) if self.is_main else _SilentLogger()
        self.logger = logger
        from tqdm.auto import tqdm

        # a time-limited run ends long before a placeholder max_steps: no misleading ETA
        time_bound = max_seconds < math.inf and max_steps >= 10**6
        bar = tqdm(total=None if time_bound else max_steps, initial=self.step, disable=not (self.options["progress"] and self.is_main),
                   desc=f"train {self.stage}", dynamic_ncols=True)
        last_saved = latest.step if latest is not None else -1
        start_step = self.step
        batch = None
        try:
            batches = self._train_batches()
            stop, _ = self.signals.poll(self.world_size)  # a signal while building or resuming
            if stop:
                self._stop(stop, last_saved)
            while self.step < max_steps and self.train_seconds < max_seconds:
                started = time.perf_counter()
                try:
                    batch = next(batches)
                except Exception:
                    if self.signals.stop:  # a data worker died of the same signal: the step before is whole
                        self._stop(self.signals.stop, last_saved)
                    raise
                logs = self.training_step(batch, self.step)
                self.scaler.update()
                self.step += 1
                self.train_seconds += time.perf_counter() - started
                bar.update(1)
                if every["log_every"] and self.step % every["log_every"] == 0:
                    values = logger.log(self.step, self._timing() | {f"train/{k}": v for k, v in logs.items()})
                    bar.set_postfix({k[6:]: f"{v:.4g}" for k, v in values.items() if k.startswith("train/")}, refresh=False)
                if every["val_every"] and self.step % every["val_every"] == 0:
                    self._unless_stopping(self._validate, logger)
                if every["sample_every"] and self.step % every["sample_every"] == 0:
                    self._unless_stopping(self._images, batch)
                stop, save = self.signals.poll(self.world_size)
                due = bool(every["checkpoint_every"]) and self.step % every["checkpoint_every"] == 0
                if (due or save or stop) and self.step != last_saved:
                    self.save_checkpoint()
                    last_saved = self.step
                if stop and self.step < max_steps and self.train_seconds < max_seconds:
                    self._stop(stop, last_saved)  # else the run is complete: end it normally
            if self.step != start_step:  # the run's end, unless there was nothing left to do
                if self.step != last_saved:
                    self.save_checkpoint()
                if not (every["val_every"] and self.step % every["val_every"] == 0):
                    self._unless_stopping(self._validate, logger)
                if not (every["sample_every"] and self.step % every["sample_every"] == 0):
                    self._unless_stopping(self._images, batch)
        finally:
            bar.close()
            logger.close()
        return self.run_dir

    def _check_image_size(self) -> None:
        """The configured image sizes against the first stage's factor f, before anything is
        written (a size not divisible by f would fail inside the first step)."""
        from ldmkit.config import ConfigError
        from ldmkit.interfaces import FirstStage

        first_stage = self.model_modules().get("first_stage")
        if not isinstance(first_stage, FirstStage):
            return
        f = int(first_stage.downsample_factor)
        keys = ["image_size"] + (["data.image_size"] if self.data is None else [])
        for key in keys:
            size = OmegaConf.select(self.cfg, key, default=None)
            if isinstance(size, int) and size % f:
                choice = (self.cfg.get("choices") or {}).get("first_stage")
                which = f"first_stage={choice}" if choice else "the first stage"
                smaller, larger = max(f, size // f * f), (size // f + 1) * f
                raise ConfigError(
                    f"{key}={size} is not divisible by the downsample factor f={f} of {which}; "
                    f"use a multiple of {f} (e.g. {smaller} or {larger})"
                )

    def _unless_stopping(self, phase: Callable[..., None], *args: Any) -> None:
        """Validation or a grid, skipped once SIGTERM/SIGINT arrived, and abandoned if the
        signal comes while it runs (it may have ended the data workers it reads from).
        Neither touches the training state, so the step before stays whole."""
        if self.signals.stop:
            return
        try:
            phase(*args)
        except Exception:
            if not self.signals.stop:
                raise

    def _stop(self, signal_name: str, last_saved: int) -> None:
        if self.step != last_saved and self.step > 0:
            self.save_checkpoint()
            last_saved = self.step
        checkpoint = self.run_dir / "checkpoints" / f"step_{self.step:09d}" if last_saved == self.step else None
        raise TrainingInterrupted(signal_name, self.step, checkpoint)

    def _timing(self) -> dict[str, float]:
        return {"train_minutes": self.train_seconds / 60.0, "epoch": float(self.epoch)}

    def _validate(self, logger: RunLogger) -> None:
        if not self.is_main:
            return
        with isolated_rng(stream_seed(self.seed, "validation")):
            batches = self.validation_batches()
            values = self.validate(batches) if batches else {}
        if values:
            logger.log(self.step, self._timing() | {f"val/{k}": v for k, v in values.items()})

    def _images(self, batch: Mapping[str, Any] | None) -> None:
        if not self.is_main:
            return
        with isolated_rng(stream_seed(self.seed, "grids")):
            val = self.validation_batches()
            source = val[0] if val else batch
            if source is None:
                return
            path = self.run_dir / "images" / f"{self.stage}_step_{self.step:09d}.png"
            grid = self.save_images(source, path)
        if grid is not None:
            self.logger.log_image(f"{self.stage}/images", grid, self.step)


def _is_resumable(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class _SilentLogger:
    """The logger of ranks other than 0: they log nothing."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        return {k: to_float(v) for k, v in metrics.items()}

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass
