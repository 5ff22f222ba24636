"""The training loop both stages share. A stage subclasses :class:`Trainer` and supplies its
models, optimizers and the body of one step; :meth:`Trainer.fit` then

1. locks the run folder (rank 0, for every rank) and watches for SIGTERM, SIGINT, SIGUSR1;
2. builds the stage (the files its components read recorded by absolute paths:
   :mod:`ldmkit.pipeline_files`), checks the image size, resumes from the newest intact
   checkpoint and writes the run's ``config.yaml``;
3. lets the stage prepare (:meth:`Trainer.before_training`: stage 2 estimates its latent
   scale factor there);
4. steps until ``max_steps`` or ``max_minutes``, with logs, validation, image grids,
   checkpoints and signals between steps, and ends with a last checkpoint, validation and
   grid.

What the loop stands on: the run's position and checkpoints (:mod:`ldmkit.training.state`),
its batches (:mod:`ldmkit.training.data`), the ranks under torchrun
(:mod:`ldmkit.training.distributed`), random streams (:mod:`ldmkit.training.rng`), signals,
the run folder's lock and the logs.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ldmkit import devices, pipeline_files
from ldmkit import precision as _precision
from ldmkit.io import (
    atomic_write_text,
    check_folder,
    remove_stale_temporaries,
    reporting_write_errors,
)
from ldmkit.training import data as _data
from ldmkit.training import distributed
from ldmkit.training.data import DataFactory, TrainBatches
from ldmkit.training.defaults import trainer_preset
from ldmkit.training.distributed import distributed_info
from ldmkit.training.errors import TrainingDivergedError, TrainingError, TrainingWarning
from ldmkit.training.logger import RunLogger, SilentLogger, to_float
from ldmkit.training.rng import isolated_rng, seed_everything, stream_seed
from ldmkit.training.run_lock import locked_for_all_ranks
from ldmkit.training.signals import SignalWatch, TrainingInterrupted
from ldmkit.training.state import Checkpoint, TrainingState
from ldmkit.training.threads import apply_num_threads

__all__ = [
    "TRAINER_DEFAULTS",
    "DataFactory",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "TrainingWarning",
    "average_logs",
    "check_image_sizes",
    "distributed_info",
    "resolve_device",
    "trainer_options",
]

# the keys both stages share and their defaults: conf/trainer/default.yaml, the one home of
# every trainer default (ldmkit.training.defaults)
TRAINER_DEFAULTS: dict[str, Any] = trainer_preset("default")

_INTERVALS = ("log_every", "sample_every", "checkpoint_every", "val_every")


def refuse_foreign_files(run_dir: Path, written: Any) -> None:
    """Raise TrainingError when ``run_dir`` holds a ``config.yaml`` or ``metrics.csv`` that no
    ldmkit run wrote (``run_dir=.`` in a project folder): a run would overwrite or append to it."""
    import yaml

    from ldmkit.training.logger import METRICS_FILE

    for name in ("config.yaml", METRICS_FILE):
        path = run_dir / name
        try:
            if not path.is_file():
                continue
            with path.open(encoding="utf-8") as handle:
                if name == METRICS_FILE:
                    ours = handle.readline().split(",")[0].strip() in ("step", "")  # "": killed before the header
                else:
                    data = yaml.safe_load(handle)
                    ours = isinstance(data, dict) and "stage" in data and "trainer" in data
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            ours = False
        if not ours:
            raise TrainingError(
                f"run_dir={written} holds {name}, which no ldmkit run wrote ({path}); a run would "
                "overwrite it: choose a new or empty folder for run_dir"
            )


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


def average_logs(logs: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """One step's logs from its micro-batches' (:meth:`Trainer.micro_batches`): each value
    averaged with the micro-batches' weights, over those that logged it."""
    if len(logs) == 1:
        return dict(logs[0])
    keys = dict.fromkeys(key for entry in logs for key in entry)
    out = {}
    for key in keys:
        pairs = [(entry[key], w) for entry, w in zip(logs, weights, strict=True) if key in entry]
        total = sum(w for _, w in pairs)
        out[key] = sum(torch.as_tensor(v).detach().float() * (w / total) for v, w in pairs)
    return out


class Trainer(abc.ABC):
    """One training run of one stage, in ``cfg.run_dir``.

    Subclasses implement :meth:`build`, :meth:`model_modules`, :meth:`optimizers`,
    :meth:`training_step`; optionally :meth:`training_modules`, :meth:`generators`,
    :meth:`hyperparameters`, :meth:`config_keys_that_must_match`,
    :meth:`config_keys_kept_from_checkpoint`, :meth:`make_loader`, :meth:`before_training`,
    :meth:`validate` and :meth:`save_images`. :meth:`fit` runs (or
    resumes) the loop and returns the run folder.

    Exact resume: a checkpoint holds the state after a step — weights, optimizers, the global
    random generators and the stage's own :meth:`generators`, and the data position
    (:mod:`ldmkit.training.state`, :mod:`ldmkit.training.data`). Grids and validation run on
    generators seeded from the run's seed, apart from the training streams, so neither how
    often they run nor where a run was stopped changes the weights.
    """

    stage: str = "?"
    #: the trainer preset (conf/trainer/<name>.yaml) whose values fill keys a config leaves out
    default_preset: str = "default"

    def __init__(self, cfg: DictConfig, *, data: DataFactory | None = None) -> None:
        self.cfg = cfg
        self.options = trainer_options(cfg, self.default_preset)
        self.run_dir = Path(cfg.get("run_dir") or f"runs/{self.stage}").expanduser()
        check_folder(self.run_dir, f"run_dir={self.run_dir}")  # before anything is built
        refuse_foreign_files(self.run_dir, cfg.get("run_dir"))
        self.rank, self.world_size = distributed_info()
        self.is_main = self.rank == 0  # only rank 0 writes checkpoints, logs and images
        self.device = resolve_device(self.options["device"])
        self.precision = self._resolve_precision()
        self.scaler = _precision.grad_scaler(self.precision, self.device)
        self.data = data
        self.seed = int(cfg.get("seed", 0))
        self.state = TrainingState(
            self.run_dir, cfg, scaler=self.scaler, keep_last=int(self.options["keep_checkpoints"]),
            resume=bool(self.options["resume"]), embed_frozen=bool(self.options.get("embed_frozen")),
        )
        self.train_batches = TrainBatches(self.make_loader, self.state, label=_data.data_label(cfg))
        self.signals = SignalWatch(enabled=False)
        self.logger: RunLogger | SilentLogger = SilentLogger()  # rank 0's writes, from fit() on
        self._val_batches: list[Mapping[str, Any]] | None = None

    def warn_unused_options(self, known: Iterable[str], nested: Mapping[str, Iterable[str]] | None = None) -> None:
        """One warning naming each trainer option outside ``known`` (the keys the stage reads;
        an added ``+trainer.KEY`` nobody reads), with the known one it may have meant;
        ``nested``: the keys read inside an option that is a mapping (``ema``: ``decay``, ...)."""
        choices = {"": sorted(set(known))}
        unknown = [("", key) for key in sorted(set(self.options) - set(choices[""]))]
        for node, keys in (nested or {}).items():
            if isinstance(self.options.get(node), Mapping):
                choices[node] = sorted(set(keys))
                unknown += [(node, key) for key in sorted(set(self.options[node]) - set(choices[node]))]
        if unknown:
            def name(node: str, key: str) -> str:
                return f"trainer.{node}.{key}" if node else f"trainer.{key}"

            named = ", ".join(
                name(node, key)
                + "".join(f" (did you mean {name(node, m)}?)" for m in difflib.get_close_matches(key, choices[node], n=1))
                for node, key in unknown
            )
            warnings.warn(f"trainer option(s) {named} are not used by stage={self.stage}", TrainingWarning, stacklevel=3)

    @property
    def step(self) -> int:
        """Optimization steps done so far (the training state's)."""
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def train_seconds(self) -> float:
        """Time spent in training steps (what ``trainer.max_minutes`` limits)."""
        return self.state.train_seconds

    # -- precision ------------------------------------------------------------------------
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

    def micro_batches(self, sizes: Sequence[int], models: Iterable[nn.Module] = ()) -> Iterator[tuple[int, float]]:
        """The micro-batches of one optimization step (``trainer.accumulate_grad_batches`` of
        them, of ``sizes`` samples), as ``(index, weight)``: scale each micro-batch's mean loss
        by ``weight``, its share of the step's samples (1/K for K equal micro-batches), and
        the gradients add up to those of the step's mean loss. All but the last run under
        ``no_sync()`` of the DDP wrappers among ``models``: the last backward all-reduces the
        sum once."""
        total = sum(sizes)
        for index, size in enumerate(sizes):
            last = index == len(sizes) - 1
            with contextlib.nullcontext() if last else distributed.no_sync(models):
                yield index, size / total

    def backward(self, loss: Tensor) -> None:
        """Accumulate ``loss``'s gradients (loss-scaled under fp16)."""
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> Tensor | None:
        """Once per optimization step, after the micro-batches' :meth:`backward`: the optional
        ``trainer.grad_clip`` of ``params`` (on unscaled gradients), the optimizer step and
        ``zero_grad``; returns the gradient norm when clipping. The engine updates the loss
        scale once per training step."""
        norm = None
        if self.options.get("grad_clip"):
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]],
                float(self.options["grad_clip"]),
            )
        self.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
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

    def config_keys_that_must_match(self) -> list[str]:
        """Config keys that define the model: a resumed run refuses to change them."""
        return []

    def config_keys_kept_from_checkpoint(self) -> list[str]:
        """Config keys whose value only starts a run (a learned parameter's init): a resumed
        run keeps the checkpoint's value and says a change is ignored."""
        return []

    #: the model is sharded across the ranks (``trainer.strategy=fsdp``): every rank takes
    #: part in validation and grids (rank 0 still writes) and in checkpoints
    sharded: bool = False

    def sharded_state(self) -> dict[str, Any] | None:
        """A sharded model's checkpoint state (:mod:`torch.distributed.checkpoint` writes it
        and loads into it in place, :mod:`ldmkit.training.state`); None: the model is whole."""
        return None

    def load_sharded_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - only sharded stages load one
        """Apply a :meth:`sharded_state` filled from a checkpoint."""

    def before_training(self) -> None:  # noqa: B027 - optional: most stages need nothing here
        """Called once per :meth:`fit`, after :meth:`build` and the resume and before the
        first step (:attr:`step` tells a fresh run from a resumed one)."""

    @abc.abstractmethod
    def training_step(self, batches: Sequence[Mapping[str, Any]], step: int) -> dict[str, Tensor]:
        """One optimization step on ``batches``, its ``trainer.accumulate_grad_batches``
        micro-batches (see :meth:`micro_batches`; ``step`` = updates done so far); returns
        logs, averaged over the micro-batches (:func:`average_logs`). Raise
        :class:`TrainingDivergedError` (see :meth:`check_finite`) on NaN/Inf."""

    def validate(self, batches: list[Mapping[str, Any]]) -> dict[str, float]:
        return {}

    def save_images(self, batch: Mapping[str, Any], path: Path) -> Tensor | None:
        """Write an image grid for ``batch`` to ``path``; return it (C×H×W in [0, 1])."""
        return None

    # -- data -----------------------------------------------------------------------------
    def make_loader(self, split: str, epoch: int) -> Iterable[Mapping[str, Any]]:
        """Batches of ``split`` from ``epoch`` on: the ``data`` factory's, else a
        :class:`ldmkit.data.ShardLoader` (resumable: it keeps its own epoch) over the
        configured dataset. :mod:`ldmkit.training.data` says how the train split is read."""
        if self.data is not None:
            return self.data(split, epoch)
        return _data.configured_loader(self.cfg, self.options, split, epoch, self.seed)

    def validation_batches(self) -> list[Mapping[str, Any]]:
        """The first ``val_batches`` batches of ``val_split``, loaded once and kept."""
        if self._val_batches is None:
            split, limit = self.options["val_split"], int(self.options["val_batches"])  # null: no validation
            if limit > 0 and split is not None:
                split = _data.validation_split(self.cfg, split, factory=self.data is not None)
            wanted = limit > 0 and split is not None
            self._val_batches = _data.first_batches(self.make_loader(split, 0), limit) if wanted else []
        return self._val_batches

    # -- checks and collectives a stage uses ----------------------------------------------
    def check_finite(self, name: str, value: Tensor, logs: Mapping[str, Any]) -> None:
        if not bool(torch.isfinite(value).all()):
            parts = ", ".join(f"{k}={to_float(v):.4g}" for k, v in logs.items())
            latest = self.state.latest()
            where = f"the last good checkpoint {latest.path} is intact" if latest else "no checkpoint was written yet"
            raise TrainingDivergedError(
                f"{self.stage} training diverged: {name} is {to_float(value)} at step {self.step} "
                f"({parts}); stopped without saving, {where}. Lower trainer.lr or check the data."
            )

    def check_interrupt(self, during: str) -> None:
        """Raise :class:`TrainingInterrupted` if SIGTERM/SIGINT arrived (for long phases
        outside the step loop, e.g. building the latent cache)."""
        stop, _ = self.signals.poll(self.world_size)
        if stop:
            latest = self.state.latest()
            raise TrainingInterrupted(stop, self.step, latest.path if latest else None, during=during)

    def barrier(self) -> None:
        distributed.barrier()

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Checkpoint | None:
        """Checkpoint the state after the current step (written by rank 0, which returns it)."""
        return self.state.save(self, self.train_batches.position())

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to ``max_steps`` (or ``max_minutes``), resuming from ``run_dir``.

        Raises :class:`TrainingInterrupted` after SIGTERM/SIGINT (``trainer.save_on_signal``),
        once the step in progress is finished and checkpointed, and :class:`TrainingError`
        when another rank stops (the process group loses its connection to it)."""
        # half the usable cores on the CPU unless told (ldmkit.training.threads: a thread team
        # larger than the free cores runs many times slower on a shared machine)
        apply_num_threads(self.options["num_threads"], self.device)
        self.signals = SignalWatch(enabled=bool(self.options["save_on_signal"]))
        # the lock is taken before the model is built: a second trainer must not fill the
        # first one's GPU (ldmkit.training.run_lock)
        with locked_for_all_ranks(self.run_dir), self.signals:
            try:
                return self._fit()
            except Exception as err:
                if not distributed.lost_connection(err):
                    raise
                raise TrainingError(self._lost_rank_message()) from err

    def _lost_rank_message(self) -> str:
        """Another rank died (killed, out of memory, its own error): what this rank says
        instead of the communication layer's traceback."""
        latest = self.state.latest()
        if latest is None:
            saved = "there is no checkpoint yet: run the same command again to start over"
        else:
            saved = (f"the newest checkpoint is step {latest.step} ({latest.path}): "
                     "run the same command again to resume")
        return f"another rank stopped (the connection to it was lost); {saved}"

    def _fit(self) -> Path:
        seed_everything(self.seed)
        if self.is_main:
            for folder in (self.run_dir, self.run_dir / "pipeline", self.run_dir / "images"):
                remove_stale_temporaries(folder)
            if self.options["progress"]:
                print(f"ldmkit train {self.stage}: {self.precision_note}", file=sys.stderr)
        self.build()
        # the files the components read, by absolute paths: the run resumes from any directory
        pipeline_files.absolute_paths(self.cfg, self.model_modules().values())
        self._check_image_size()
        from ldmkit.checkpoint_layout import list_checkpoints

        if self.data is None and not list_checkpoints(self.state.checkpoints.directory):
            # a run from step 0 reads its dataset's manifest before it writes anything: a
            # dataset that is not there leaves no half-made run folder (the lock removes the
            # folder it made)
            from ldmkit.data.loader import data_config, load_manifest

            load_manifest(data_config(self.cfg.data))
        latest = self.state.resume(self)
        if self.is_main:
            with reporting_write_errors(self.run_dir):
                self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
            self.logger = RunLogger(
                self.run_dir, resume_step=latest.step if latest is not None else None,
                tensorboard=bool(self.options["tensorboard"]),
            )
        try:
            self.before_training()
            self._steps(last_saved=latest.step if latest is not None else -1)
        finally:
            self.logger.close()
        return self.run_dir

    def _steps(self, last_saved: int) -> None:
        """Step until ``max_steps`` or ``max_minutes``; between steps: logs, validation,
        grids, checkpoints (every ``checkpoint_every``, on SIGUSR1, and on SIGTERM/SIGINT,
        which then stop the run)."""
        state = self.state
        max_steps = int(self.options["max_steps"])
        max_minutes = self.options["max_minutes"]
        max_seconds = float(max_minutes) * 60.0 if max_minutes is not None else math.inf
        every = {key: int(self.options[key] or 0) for key in _INTERVALS}

        def due(interval: str) -> bool:
            return bool(every[interval]) and state.step % every[interval] == 0

        from tqdm.auto import tqdm

        # a time-limited run ends long before a placeholder max_steps: no misleading ETA
        time_bound = max_seconds < math.inf and max_steps >= 10**6
        bar = tqdm(total=None if time_bound else max_steps, initial=state.step,
                   disable=not (self.options["progress"] and self.is_main),
                   desc=f"train {self.stage}", dynamic_ncols=True)
        start_step, batch, batches = state.step, None, None
        accumulate = int(self.options["accumulate_grad_batches"])
        if state.step >= max_steps or state.train_seconds >= max_seconds:  # a rerun of a finished run
            done = (f"trainer.max_steps={max_steps} is reached" if state.step >= max_steps else
                    f"its time budget (trainer.max_minutes={max_minutes}) is used up")  # fmt: skip
            warnings.warn(
                f"nothing to train: the run is at step {state.step} and {done}; raise it to train on",
                TrainingWarning, stacklevel=2,
            )
        try:
            batches = iter(self.train_batches)
            stop, _ = self.signals.poll(self.world_size)  # a signal while building or resuming
            if stop:
                self._stop(stop, last_saved)
            while state.step < max_steps and state.train_seconds < max_seconds:
                started = time.perf_counter()
                micro: list[Mapping[str, Any]] = []
                try:
                    while len(micro) < accumulate:
                        micro.append(next(batches))
                except Exception:
                    if self.signals.stop:  # a data worker died of the same signal: the step before is whole
                        self._stop(self.signals.stop, last_saved, mid_step=bool(micro))
                    raise
                batch = micro[-1]
                logs = self.training_step(micro, state.step)
                self.scaler.update()
                state.step += 1
                state.train_seconds += time.perf_counter() - started
                bar.update(1)
                if due("log_every"):
                    values = self.logger.log(state.step, self._timing() | {f"train/{k}": v for k, v in logs.items()})
                    bar.set_postfix({k[6:]: f"{v:.4g}" for k, v in values.items() if k.startswith("train/")}, refresh=False)
                if due("val_every"):
                    self._unless_stopping(self._validate)
                if due("sample_every"):
                    self._unless_stopping(self._images, batch)
                stop, save = self.signals.poll(self.world_size)
                if (due("checkpoint_every") or save or stop) and state.step != last_saved:
                    self.save_checkpoint()
                    last_saved = state.step
                if stop and state.step < max_steps and state.train_seconds < max_seconds:
                    self._stop(stop, last_saved)  # else the run is complete: end it normally
            if state.step != start_step:  # the run's end, unless there was nothing left to do
                if state.step != last_saved:
                    self.save_checkpoint()
                if not due("val_every"):
                    self._unless_stopping(self._validate)
                if not due("sample_every"):
                    self._unless_stopping(self._images, batch)
        finally:
            bar.close()
            if hasattr(batches, "close"):
                # End the data workers now: an exception's traceback keeps this frame, and with
                # it the workers, alive until it is collected (after a stop signal the signal
                # watch also leaves SIGCHLD at the default, for workers that signal ended)
                batches.close()

    def _check_image_size(self) -> None:
        """The configured image sizes against the first stage's factor f, and data.channels
        against its image channels, before anything is written (a size not divisible by f, or
        other channels, would fail inside the first step)."""
        from ldmkit.interfaces import FirstStage

        first_stage = self.model_modules().get("first_stage")
        if not isinstance(first_stage, FirstStage):
            return
        choice = (self.cfg.get("choices") or {}).get("first_stage")
        check_image_sizes(
            self.cfg, int(first_stage.downsample_factor),
            f"first_stage={choice}" if choice else "the first stage", data=self.data is None,
        )  # fmt: skip
        channels = OmegaConf.select(self.cfg, "data.channels", default=None)
        if self.data is None and isinstance(channels, int) and channels != first_stage.image_channels:
            # else a TrainingError at the first batch, after the data is opened
            from ldmkit.config import ConfigError, config_dir

            follow = ", ".join(sorted(p.stem for p in (config_dir() / "first_stage").glob("*_data.yaml")))
            raise ConfigError(
                f"data.channels={channels} but {f'first_stage={choice}' if choice else 'the first stage'} takes "
                f"{first_stage.image_channels}-channel images; use a first stage that follows data.channels "
                f"(first_stage={follow}), or data.channels={first_stage.image_channels}"
                + (" (gray replicated to RGB)" if first_stage.image_channels == 3 else "")
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

    def _stop(self, signal_name: str, last_saved: int, *, mid_step: bool = False) -> None:
        if mid_step:  # the data position is inside the next step: resume from the last checkpoint
            latest = self.state.latest()
            raise TrainingInterrupted(signal_name, latest.step if latest else 0, latest.path if latest else None,
                                      during=f"between the micro-batches of step {self.step + 1}")
        if self.step != last_saved and self.step > 0:
            self.save_checkpoint()
            last_saved = self.step
        checkpoint = self.run_dir / "checkpoints" / f"step_{self.step:09d}" if last_saved == self.step else None
        raise TrainingInterrupted(signal_name, self.step, checkpoint)

    def _timing(self) -> dict[str, float]:
        return {"train_minutes": self.train_seconds / 60.0, "epoch": float(self.epoch)}

    def _validate(self) -> None:
        if not (self.is_main or self.sharded):
            return
        with isolated_rng(stream_seed(self.seed, "validation")):
            batches = self.validation_batches()
            values = self.validate(batches) if batches else {}
        if values:
            self.logger.log(self.step, self._timing() | {f"val/{k}": v for k, v in values.items()})

    def _images(self, batch: Mapping[str, Any] | None) -> None:
        if not (self.is_main or self.sharded):
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


def check_image_sizes(cfg: Any, f: int, which: str, *, data: bool = True) -> None:
    """Raise :class:`ConfigError` naming the key when ``image_size`` (and ``data.image_size``
    where ``data``: the configured dataset is read) is not divisible by the factor ``f`` of
    the first stage ``which`` names."""
    from ldmkit.config import ConfigError

    for key in ["image_size"] + (["data.image_size"] if data else []):
        size = OmegaConf.select(cfg, key, default=None)
        if isinstance(size, int) and size % f:
            nearest = [n for n in (size // f * f, (size // f + 1) * f) if n > 0]
            raise ConfigError(
                f"{key}={size} is not divisible by the downsample factor f={f} of {which}; "
                f"use a multiple of {f} (e.g. {' or '.join(map(str, nearest))})"
            )
