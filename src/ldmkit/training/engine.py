"""The training engine both stages share: run folder, resume, the step loop, time limit,
validation, image grids, logs, progress bar and checkpoints. A stage subclasses
:class:`Trainer` and supplies its models, optimizers and the body of one step."""

from __future__ import annotations

import abc
import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ldmkit.errors import LdmkitError
from ldmkit.io import atomic_write_text
from ldmkit.training.checkpoint import (
    Checkpoint,
    CheckpointManager,
    flatten_state,
    load_state,
    read_safetensors,
    unflatten_state,
)
from ldmkit.training.logger import RunLogger, to_float

# (split, epoch) -> an iterable of batch dicts; lets tests and notebooks train on
# in-memory data instead of the configured dataset
DataFactory = Callable[[str, int], Iterable[Mapping[str, Any]]]

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 1000,
    "max_minutes": None,  # stop after this much training time (summed over resumes)
    "batch_size": 16,
    "num_workers": 0,
    "lr": 1.0e-4,
    "log_every": 50,
    "sample_every": 500,  # image grids (reconstructions for stage 1)
    "checkpoint_every": 500,
    "keep_checkpoints": 3,
    "val_every": 0,  # 0: validate only at the end
    "val_batches": 4,
    "val_split": "test",
    "device": "auto",
    "resume": True,
    "progress": True,
    "tensorboard": True,
    "grad_clip": None,
    "num_threads": None,  # CPU threads for torch (null: torch's default)
}


class TrainingError(LdmkitError, RuntimeError):
    """Training cannot start or continue (the run folder is left as it was)."""


class TrainingDivergedError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite; the last good checkpoint is untouched."""


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        if torch.cuda.is_available():
            # under torchrun each process takes the GPU of its local rank
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"trainer.device={name!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available here")
    return device


def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` over :data:`TRAINER_DEFAULTS` (a missing key takes its default)."""
    node = cfg.get("trainer")
    options = dict(TRAINER_DEFAULTS)
    if node is not None:
        options.update(OmegaConf.to_container(node, resolve=True))
    return options


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Validation and image grids draw random numbers (posterior samples, data order)
    without moving the training streams, so a resumed run replays the same steps."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(abc.ABC):
    """One training run of one stage, in ``cfg.run_dir``.

    Subclasses implement :meth:`build`, :meth:`model_modules`, :meth:`optimizers`,
    :meth:`training_step`; optionally :meth:`training_modules`, :meth:`validate` and
    :meth:`save_images`. :meth:`fit` runs (or resumes) the loop and returns the run folder.
    """

    stage: str = "?"

    def __init__(self, cfg: DictConfig, *, data: DataFactory | None = None) -> None:
        self.cfg = cfg
        self.options = trainer_options(cfg)
        self.run_dir = Path(cfg.get("run_dir") or f"runs/{self.stage}")
        self.rank, self.world_size = distributed_info()
        self.is_main = self.rank == 0  # only rank 0 writes checkpoints, logs and images
        self.device = resolve_device(self.options["device"])
        self.data = data
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_seconds = 0.0
        self._val_batches: list[Mapping[str, Any]] | None = None

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
        if self.data is not None:
            return self.data(split, epoch)
        from ldmkit.data import build_dataloader

        return build_dataloader(
            self.cfg.data,
            batch_size=int(self.options["batch_size"]),
            split=split,
            num_workers=int(self.options["num_workers"]),
            seed=int(self.cfg.get("seed", 0)) + epoch,
        )

    def _train_batches(self) -> Iterator[Mapping[str, Any]]:
        skip = self.batches_in_epoch  # resuming mid-epoch: replay the epoch's order up to here
        while True:
            produced = 0
            for index, batch in enumerate(self.make_loader("train", self.epoch)):
                produced += 1
                if index < skip:
                    continue
                self.batches_in_epoch = index + 1
                yield batch
            if produced == 0:
                raise TrainingError(f"the train split of data={self._data_label()} yielded no batches")
            skip = 0
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

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Checkpoint | None:
        if not self.is_main:
            self.barrier()
            return None
        checkpoint = self._write_checkpoint()
        self.barrier()
        return checkpoint

    def _write_checkpoint(self) -> Checkpoint:
        state = {
            "stage": self.stage,
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "train_seconds": self.train_seconds,
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers().items()},
            "rng": _rng_state(),
        }
        return self.checkpoints.save(
            self.step,
            model=flatten_state(self.model_modules()),
            training=flatten_state(self.training_modules()) or None,
            state=state,
            config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
        )

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        state = load_state(checkpoint)
        if state.get("stage") != self.stage:
            raise TrainingError(
                f"{checkpoint.path} is a checkpoint of stage {state.get('stage')!r}, not "
                f"{self.stage!r}; use another run_dir"
            )
        weights = read_safetensors(checkpoint.model_file)
        for prefix, module in self.model_modules().items():
            self._load_module(module, unflatten_state(weights, prefix), checkpoint.model_file, prefix)
        if self.training_modules():
            extra = read_safetensors(checkpoint.path / "training.safetensors")
            for prefix, module in self.training_modules().items():
                self._load_module(module, unflatten_state(extra, prefix), checkpoint.path, prefix)
        for key, optimizer in self.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][key])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.train_seconds = float(state["train_seconds"])
        _set_rng_state(state["rng"])

    def _load_module(self, module: nn.Module, tensors: dict[str, Tensor], source: Path, prefix: str) -> None:
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise TrainingError(
                f"checkpoint {source} does not fit the {prefix} built from the current config "
                f"(was the config changed since the run started?): {err}"
            ) from err

    def _check_same_config(self, checkpoint: Checkpoint) -> None:
        if not checkpoint.config_file.is_file():
            return
        saved = OmegaConf.load(checkpoint.config_file)
        for key in self.config_keys_that_must_match():
            before, now = OmegaConf.select(saved, key), OmegaConf.select(self.cfg, key)
            before = OmegaConf.to_container(before, resolve=True) if isinstance(before, DictConfig) else before
            now = OmegaConf.to_container(now, resolve=True) if isinstance(now, DictConfig) else now
            if before != now:
                raise TrainingError(
                    f"run_dir {self.run_dir} holds a run whose {key} was {before}, but the current "
                    f"config has {now}; resume with the same {key}, or start a new run_dir"
                )

    def config_keys_that_must_match(self) -> list[str]:
        return []

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> Path:
        if self.options["num_threads"]:
            # on a shared CPU, fewer threads than cores avoids OpenMP spin-wait slowdowns
            torch.set_num_threads(int(self.options["num_threads"]))
        seed_everything(int(self.cfg.get("seed", 0)))
        self.build()
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=int(self.options["keep_checkpoints"])
        )
        if self.is_main:
            self.checkpoints.remove_incomplete()
        self.barrier()
        latest = self.checkpoints.latest()
        if latest is not None:
            if not self.options["resume"]:
                raise TrainingError(
                    f"run_dir {self.run_dir} already holds checkpoints (latest: {latest.path}) and "
                    f"trainer.resume=false; choose another run_dir or delete that one"
                )
            self._check_same_config(latest)
            self.load_checkpoint(latest)
        if self.is_main:
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
            while self.step < max_steps and self.train_seconds < max_seconds:
                started = time.perf_counter()
                batch = next(batches)
                logs = self.training_step(batch, self.step)
                self.step += 1
                self.train_seconds += time.perf_counter() - started
                bar.update(1)
                if every["log_every"] and self.step % every["log_every"] == 0:
                    values = logger.log(self.step, self._timing() | {f"train/{k}": v for k, v in logs.items()})
                    bar.set_postfix({k[6:]: f"{v:.4g}" for k, v in values.items() if k.startswith("train/")}, refresh=False)
                if every["val_every"] and self.step % every["val_every"] == 0:
                    self._validate(logger)
                if every["sample_every"] and self.step % every["sample_every"] == 0:
                    self._images(batch)
                if every["checkpoint_every"] and self.step % every["checkpoint_every"] == 0:
                    self.save_checkpoint()
                    last_saved = self.step
            if self.step != start_step:  # the run's end, unless there was nothing left to do
                if self.step != last_saved:
                    self.save_checkpoint()
                if not (every["val_every"] and self.step % every["val_every"] == 0):
                    self._validate(logger)
                if not (every["sample_every"] and self.step % every["sample_every"] == 0):
                    self._images(batch)
        except KeyboardInterrupt:
            if self.step != last_saved and self.step > 0:
                self.save_checkpoint()  # Ctrl-C keeps the progress made
            raise
        finally:
            bar.close()
            logger.close()
        return self.run_dir

    def _timing(self) -> dict[str, float]:
        return {"train_minutes": self.train_seconds / 60.0, "epoch": float(self.epoch)}

    def _validate(self, logger: RunLogger) -> None:
        if not self.is_main:
            return
        with preserved_rng():
            batches = self.validation_batches()
            values = self.validate(batches) if batches else {}
        if values:
            logger.log(self.step, self._timing() | {f"val/{k}": v for k, v in values.items()})

    def _images(self, batch: Mapping[str, Any] | None) -> None:
        if not self.is_main:
            return
        with preserved_rng():
            val = self.validation_batches()
            source = val[0] if val else batch
            if source is None:
                return
            path = self.run_dir / "images" / f"{self.stage}_step_{self.step:09d}.png"
            grid = self.save_images(source, path)
        if grid is not None:
            self.logger.log_image(f"{self.stage}/images", grid, self.step)


class _SilentLogger:
    """The logger of ranks other than 0: they log nothing."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        return {k: to_float(v) for k, v in metrics.items()}

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass
