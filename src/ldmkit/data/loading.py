"""Loading prepared shards: a resumable stream of WebDataset shards for training, a map-style
dataset for tiny data.

Stream (``build_dataloader``)::

    shard list --(seeded shuffle per epoch | resampling with replacement)
      -> split by node (rank) -> split by DataLoader worker
      -> windows of shards (about data.shuffle_buffer samples each)
      -> read a window's tar members, group by key (damage skipped and recorded)
      -> permute the window (seeded)
      -> decode PNG + label/caption/class map, transform       (corrupt samples recorded)
      -> batch in the worker

Every step is a pure function of (seed, epoch, rank, worker, window, index), so the loader's
position — each worker's (window, index) — is all a checkpoint needs to continue an epoch
exactly (``ShardLoader.state_dict`` / ``load_state_dict``). Each worker's skip events ride
along with its next batch (or an event-only message at its end) to the main process, where
``loader.stats`` (a ``DataStats``) counts them; the worker has already logged each one with its
shard and key.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import os
import random
import signal
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ldmkit.data.errors import DataError
from ldmkit.data.manifest import Manifest, read_manifest
from ldmkit.data.shards import CAPTION, IMAGE, LABEL, META, SEGMENTATION, iter_shard
from ldmkit.data.stats import DataStats, SkipEvent
from ldmkit.data.transforms import ImageTransform, parse_background

logger = logging.getLogger("ldmkit.data")

SKIPPED = "__skipped__"  # batch key carrying a worker's skip events; removed before the caller
POSITION = "__position__"  # batch key: (worker, window, index) after the batch; removed likewise

CONFIG_DEFAULTS: dict[str, Any] = {
    "source": None,  # the prepare source (used in the "how to prepare" hint)
    "path": None,  # the prepared folder; default data/<source>
    "image_size": 32,
    "channels": 3,
    "crop": "center",
    "flip": False,
    "background": [255, 255, 255],
    "shuffle_buffer": 1000,
    "resampled": None,  # None: on when world_size > 1
    "prepare": {},  # extra `ldmkit data prepare` options (hint and ensure_prepared)
}


# --------------------------------------------------------------------------- configuration


def data_config(data_cfg: Any) -> dict[str, Any]:
    """The ``data`` node (DictConfig or mapping) as a plain dict with defaults filled in."""
    if data_cfg is None:
        raise DataError("no data config given (the composed cfg.data node)")
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(data_cfg, Mapping):
        raise DataError(f"data config must be a mapping, got {type(data_cfg).__name__}")
    unknown = sorted(set(data_cfg) - set(CONFIG_DEFAULTS))
    if unknown:
        raise DataError(
            f"unknown data config key {unknown[0]!r}; expected keys: {', '.join(CONFIG_DEFAULTS)}"
        )
    cfg = {**CONFIG_DEFAULTS, **data_cfg}
    if cfg["path"] is None and cfg["source"] is None:
        raise DataError("data config needs `path` (the prepared folder) or `source`")
    return cfg


def dataset_dir(cfg: Mapping[str, Any]) -> Path:
    """Where the shards are: ``path``, relative to the directory the run was started in."""
    path = Path(os.path.expanduser(str(cfg["path"] or f"data/{cfg['source']}")))
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            from hydra.utils import get_original_cwd

            return Path(get_original_cwd()) / path
    except ImportError:  # pragma: no cover
        pass
    return Path.cwd() / path


def transform_from(cfg: Mapping[str, Any]) -> ImageTransform:
    return ImageTransform(
        image_size=int(cfg["image_size"]),
        channels=int(cfg["channels"]),
        crop=str(cfg["crop"]),
        flip=bool(cfg["flip"]),
        background=parse_background(cfg["background"]),
    )


def load_manifest(cfg: Mapping[str, Any]) -> tuple[Path, Manifest]:
    directory = dataset_dir(cfg)
    hint = cfg["source"] or "<source>"
    extra = " ".join(f"{k}={v}" for k, v in (cfg["prepare"] or {}).items())
    return directory, read_manifest(directory, source=f"{hint} {extra}".strip() if extra else hint)


def ensure_prepared(data_cfg: Any, *, progress: bool = True) -> Manifest:
    """Prepare the configured dataset if its folder has no manifest yet (single process only:
    in a multi-rank job prepare beforehand with ``ldmkit data prepare``)."""
    cfg = data_config(data_cfg)
    directory = dataset_dir(cfg)
    try:
        return read_manifest(directory)
    except FileNotFoundError:
        if cfg["source"] is None:
            raise
    from ldmkit.data.prepare import prepare

    options = {"progress": progress, **(cfg["prepare"] or {})}
    return prepare(cfg["source"], directory, **options)


# --------------------------------------------------------------------------- decoding


class SampleError(Exception):
    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class SampleDecoder:
    """Raw tar members -> a training sample dict (``image``, ``label``, optional ``caption`` and
    ``segmentation``, ``__key__``)."""

    fields: tuple[str, ...]  # the members a sample must have
    transform: ImageTransform

    @classmethod
    def for_manifest(cls, manifest: Manifest, transform: ImageTransform) -> SampleDecoder:
        # the json member is for people and tools; training does not need it intact
        return cls(tuple(f for f in manifest.fields if f != META), transform)

    @property
    def with_caption(self) -> bool:
        return CAPTION in self.fields

    @property
    def with_segmentation(self) -> bool:
        return SEGMENTATION in self.fields

    def __call__(self, raw: Mapping[str, Any], rng: Any = None) -> dict[str, Any]:
        missing = [f for f in self.fields if f not in raw]
        if missing:
            raise SampleError("incomplete", f"no {', '.join(missing)} member")
        try:
            image = _open_png(raw[IMAGE])
            label = int(raw[LABEL].decode("ascii")) if LABEL in raw else -1
            sample: dict[str, Any] = {"label": label}
            if self.with_caption:
                sample["caption"] = raw[CAPTION].decode("utf-8")
            segmentation = None
            if self.with_segmentation:
                segmentation = _open_png(raw[SEGMENTATION])
                if segmentation.mode != "L" or segmentation.size != image.size:
                    raise ValueError(
                        f"class map is {segmentation.mode} {segmentation.size}, "
                        f"image is {image.size}"
                    )
        # PIL reports broken PNGs through many exception types (OSError, SyntaxError, zlib and
        # struct errors, ValueError); any of them means this one sample is unusable
        except Exception as exc:
            raise SampleError("corrupt", f"{type(exc).__name__}: {exc}") from exc
        sample["image"], seg = self.transform(image, segmentation, rng)
        if seg is not None:
            sample["segmentation"] = seg
        sample["__key__"] = str(raw["__key__"])
        return sample


def _open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so damage shows up here and not in the transform
    return image


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample dicts -> one batch, whatever the keys: tensors are stacked, numbers become
    a tensor (int64 / float32), everything else (captions, ``__key__``) a list. Which keys a
    model reads is its conditioner's business (``Conditioner.input_keys``), not the loader's."""
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if key.startswith("__"):
            batch[key] = values
        elif isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool | int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


# --------------------------------------------------------------------------- the stream


@dataclass
class _Context:
    """Who is reading (rank, logical worker), from where, and the seeded random streams
    derived from it: every stream is a function of (seed, epoch, rank, worker, purpose)."""

    rank: int
    world_size: int
    worker: int  # the logical worker (see ShardStream: equal to the DataLoader worker id
    num_workers: int  # unless resuming)
    epoch: int
    seed: str
    start: tuple[int, int] = (0, 0)  # (window, index in window) of the first sample to read
    events: list[SkipEvent] = field(default_factory=list)
    stats: DataStats = field(default_factory=lambda: DataStats(max_events=0))
    fruitless: int = 0  # consecutive shard reads without a valid sample (resampled streams)

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{self.worker}/{purpose}")

    def skip(self, event: SkipEvent, *, log: bool = True) -> None:
        self.events.append(event)
        if log:
            self.stats.record(event)


@dataclass(frozen=True)
class _Resume:
    """Where each logical worker continues, and which logical worker the DataLoader's
    worker 0 plays (the one whose batch came next when the position was saved)."""

    positions: tuple[tuple[int, int], ...]
    first_worker: int


class ShardStream(IterableDataset):
    """The sample stream over one split's shards (see the module docstring), built so that a
    position inside an epoch can be stored and resumed exactly.

    Each (rank, worker) reads its own list of shards in *windows* of ``window`` shards (about
    ``shuffle_buffer`` samples): a window is read whole, its raw samples are permuted, then
    decoded and batched in the worker. The window's shards, its permutation and each sample's
    augmentation are pure functions of (seed, epoch, rank, worker, window, index), so a worker
    restarted at (window, index) continues exactly where it was, reading one window again
    but decoding nothing twice.

    Not resampled: one pass; shards are shuffled with ``seed`` and the epoch (the same order on
    every rank, so the rank split is a partition), then dealt to ranks and workers round-robin.
    Resampled: every (rank, worker) draws each window's shards with replacement from its own
    seeded stream, forever, so all ranks see equally long streams and step-based training
    never runs dry.
    """

    def __init__(
        self,
        shards: list[str],
        decoder: SampleDecoder,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        seed: int = 0,
        shard_samples: list[int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = list(shards)
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.drop_last = drop_last
        self.seed = seed
        self.salt = ""  # changes the streams after a resume that could not be exact
        self.window = _window_shards(self.shuffle_buffer, shard_samples)
        self.epoch = 0
        self.resume: _Resume | None = None  # set by ShardLoader for the next iter() only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _context(self) -> _Context:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        physical = info.id if info else 0
        resume = self.resume
        worker, start = physical, (0, 0)
        if resume is not None and len(resume.positions) == num_workers:
            worker = (physical + resume.first_worker) % num_workers
            start = resume.positions[worker]
        return _Context(
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            epoch=self.epoch,
            seed=f"{self.seed}{self.salt}",
            start=(int(start[0]), int(start[1])),
        )

    def _worker_shards(self, ctx: _Context) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}{self.salt}/{self.epoch}/shards").shuffle(shards)
        return shards[self.rank :: self.world_size][
            ctx.worker :: ctx.num_workers
        ]  # by node, by worker

    def _window_of(self, ctx: _Context, mine: list[str] | None, index: int) -> list[str] | None:
        """The shards of window ``index`` of this worker (None: past the end of the epoch)."""
        if mine is None:  # resampled
            rng = ctx.rng(f"window/{index}")
            return [rng.choice(self.shards) for _ in range(self.window)]
        return mine[index * self.window : (index + 1) * self.window] or None

    def _read(self, ctx: _Context, shards: list[str]) -> list[dict[str, Any]]:
        raws = []
        for shard in shards:
            raws.extend(iter_shard(shard, ctx.stats, on_skip=partial(ctx.skip, log=False)))
        return raws

    def _samples(self, ctx: _Context) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """``((window, index + 1), sample)``: each valid sample with the position after it."""
        mine = None if self.resampled else self._worker_shards(ctx)
        # a resampled stream over shards that hold nothing valid would spin forever
        patience = max(20, 3 * len(self.shards))
        window, offset = ctx.start
        while (shards := self._window_of(ctx, mine, window)) is not None:
            raws = self._read(ctx, shards)
            if self.shuffle:
                ctx.rng(f"order/{window}").shuffle(raws)
            valid_before = ctx.stats.samples
            for index in range(offset, len(raws)):
                raw = raws[index]
                try:
                    sample = self.decoder(raw, ctx.rng(f"augment/{window}/{index}"))
                except SampleError as exc:
                    ctx.skip(
                        SkipEvent(exc.kind, str(raw["__shard__"]), str(raw["__key__"]), str(exc))
                    )
                    continue
                ctx.stats.samples += 1
                yield (window, index + 1), sample
            ctx.fruitless = 0 if ctx.stats.samples > valid_before else ctx.fruitless + len(shards)
            if self.resampled and ctx.fruitless >= patience:
                raise DataError(
                    f"no valid sample in {ctx.fruitless} consecutive shard reads "
                    f"(rank {ctx.rank}, worker {ctx.worker}): {ctx.stats.summary()}"
                )
            window, offset = window + 1, 0

    def _batch(
        self, ctx: _Context, samples: Iterator[tuple[tuple[int, int], dict[str, Any]]]
    ) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []

        def emit(items: list[dict[str, Any]], position: tuple[int, int] | None) -> dict[str, Any]:
            out = collate(items) if items else {}
            if position is not None:
                out[POSITION] = (ctx.worker, *position)
            if ctx.events:
                out[SKIPPED] = list(ctx.events)
                ctx.events.clear()
            return out

        position = None
        for position, sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield emit(batch, position)
                batch = []
        if batch and not self.drop_last:
            yield emit(batch, position)
        if ctx.events:
            yield emit([], None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ctx = self._context()  # now, not at the first next(): the resume point is read here
        return self._batch(ctx, self._samples(ctx))


def _window_shards(shuffle_buffer: int, shard_samples: list[int] | None) -> int:
    """Shards per window: enough for about ``shuffle_buffer`` samples (1 without shuffling)."""
    if shuffle_buffer <= 1 or not shard_samples:
        return 1
    mean = sum(shard_samples) / len(shard_samples)
    return max(1, math.ceil(shuffle_buffer / max(mean, 1.0)))


def _ignore_signals_in_worker(worker_id: int) -> None:
    """Workers leave SIGINT and SIGUSR1 to the main process: Ctrl-C reaches the whole process
    group, and a worker dying of it would fail the epoch before the trainer could finish its
    step and checkpoint (see ldmkit.training.signals). SIGTERM keeps its default: it is how
    multiprocessing stops leftover workers at exit."""
    for name in ("SIGINT", "SIGUSR1"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)


class ShardLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` (batches are made in the workers).

    ``stats`` counts valid and skipped samples across workers; ``manifest``, ``directory``,
    ``split``, ``num_samples`` and ``classes`` describe the data. Each ``iter()`` is one epoch
    (endless when resampled), epoch ``loader.epoch`` (``epoch`` at first), which then
    advances; the shard order changes per epoch.

    Resuming: ``state_dict()`` is the position after the last batch handed out (epoch, each
    worker's window and index, which worker's batch comes next); after ``load_state_dict``
    the next ``iter()`` continues there exactly — with the same number of workers. The
    DataLoader takes batches from its workers in turn, so the worker whose batch came next
    becomes worker 0 of the resumed epoch. The DataLoader's own seed comes from a generator
    of its own, so creating an iterator never draws from torch's global generator.
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        manifest: Manifest,
        directory: Path,
        split: str,
        epoch: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(stream.seed))
        kwargs.setdefault("worker_init_fn", _ignore_signals_in_worker)
        super().__init__(stream, batch_size=None, **kwargs)
        self.stats = DataStats()
        self.manifest = manifest
        self.directory = directory
        self.split = split
        self.num_samples = manifest.split(split).num_samples
        self.classes = list(manifest.classes)
        self.segmentation_classes = list(manifest.segmentation_classes)
        self.epoch = epoch
        self._resume: dict[str, Any] | None = None
        self._position = self._start_of(epoch)

    @property
    def readers(self) -> int:
        """Workers of this rank (1 without DataLoader workers)."""
        return max(1, self.num_workers)

    def _start_of(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "positions": [[0, 0] for _ in range(self.readers)],
            "next_worker": 0,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        position = (
            self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        )
        self._resume = None
        resumed = position is not None and position != self._start_of(epoch)
        self._position = copy.deepcopy(position or self._start_of(epoch))
        stream: ShardStream = self.dataset
        stream.set_epoch(epoch)
        stream.resume = _Resume(
            tuple((int(w), int(i)) for w, i in self._position["positions"]),
            int(self._position["next_worker"]),
        )
        try:
            batches_iter = super().__iter__()  # the workers take the stream (and resume point) now
        finally:
            stream.resume = None
        batches = 0
        for batch in batches_iter:
            events = batch.pop(SKIPPED, None)
            if events:
                self.stats.merge_events(events)
            where = batch.pop(POSITION, None)
            if "image" not in batch:
                continue
            if where is not None:
                worker, window, index = (int(v) for v in where)
                self._position["positions"][worker] = [window, index]
                self._position["next_worker"] = (worker + 1) % self.readers
            self.stats.samples += len(batch["__key__"])
            batches += 1
            yield batch
        if batches == 0 and not resumed:
            raise DataError(
                f"no valid sample in split {self.split!r} of {self.directory} "
                f"(rank {stream.rank} of {stream.world_size}): {self.stats.summary()}"
            )

    # -- resuming ---------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        stream: ShardStream = self.dataset
        names = "\n".join(Path(s).name for s in stream.shards)
        return {
            "kind": "shards",
            "split": self.split,
            "shards": hashlib.sha256(names.encode()).hexdigest()[:16],
            "window": stream.window,
            "readers": self.readers,
            "rank": stream.rank,
            "world_size": stream.world_size,
            "resampled": stream.resampled,
            "shuffle": stream.shuffle,
            "seed": stream.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out (plain data: store it anywhere)."""
        return {
            **self._identity(),
            **copy.deepcopy(self._position),
            "batch_size": self.dataset.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        """Continue at ``state`` with the next ``iter()``. Returns None when that is exact,
        else why not (then the saved epoch starts again from its beginning, and a resampled
        stream continues with fresh draws instead of repeating the ones already seen)."""
        epoch = int(state.get("epoch", 0))
        self.epoch = epoch
        reasons = []
        mine = self._identity()
        for key, what in (
            ("kind", "the data source"),
            ("split", "the split"),
            ("shards", "the split's shards"),
            ("readers", "the number of DataLoader workers (trainer.num_workers)"),
            ("world_size", "the number of ranks"),
            ("rank", "the rank"),
            ("window", "the shuffle window (data.shuffle_buffer or the shard sizes)"),
            ("resampled", "data.resampled"),
            ("shuffle", "shuffling"),
            ("seed", "the seed"),
        ):
            if state.get(key) != mine[key]:
                reasons.append(f"{what} changed from {state.get(key)} to {mine[key]}")
        if reasons:
            if self.dataset.resampled:
                self.dataset.salt = (
                    "/restart-"
                    + hashlib.sha256(repr(sorted(state.items())).encode()).hexdigest()[:8]
                )
            return (
                f"the data position cannot be restored exactly: {'; '.join(reasons)}; epoch {epoch} "
                f"{'continues with fresh draws' if self.dataset.resampled else 'starts again from its beginning'}"
            )
        self._resume = {
            "epoch": epoch,
            "positions": [[int(w), int(i)] for w, i in state["positions"]],
            "next_worker": int(state["next_worker"]),
        }
        return None


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
    return (0 if rank is None else int(rank)), (1 if world_size is None else int(world_size))


def build_dataloader(
    data_cfg: Any,
    *,
    batch_size: int,
    split: str = "train",
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    resampled: bool | None = None,
    seed: int = 0,
    shuffle: bool | None = None,
    drop_last: bool = False,
    epoch: int = 0,
) -> ShardLoader:
    """A DataLoader of batch dicts over the prepared shards of ``split``.

    Batches: ``image`` float32 B x C x S x S in [-1, 1], ``label`` int64 B (-1: none),
    ``caption`` list[str] and ``segmentation`` int64 B x S x S where the data has them,
    ``__key__`` list[str]. ``rank``/``world_size`` default to torch.distributed's.
    ``resampled`` (default: the config's, else on when world_size > 1) makes the stream endless.
    ``shuffle`` (default: on for the train split) also switches random crop/flip. The first
    ``iter()`` is epoch ``epoch``; each one advances it.
    """
    cfg = data_config(data_cfg)
    rank, world_size = _distributed_defaults(rank, world_size)
    directory, manifest = load_manifest(cfg)
    info = manifest.split(split)
    if resampled is None:
        resampled = cfg["resampled"] if cfg["resampled"] is not None else world_size > 1
    shuffle = split == "train" if shuffle is None else shuffle
    transform = transform_from(cfg)
    if not shuffle:
        transform = transform.without_augmentation()
    shards = [str(directory / shard.name) for shard in info.shards]
    readers = world_size * max(1, num_workers)
    if not resampled and len(shards) < readers:
        warnings.warn(
            f"{directory} split {split!r} has {len(shards)} shards for {readers} readers "
            f"({world_size} ranks x {max(1, num_workers)} workers): some get no data; prepare "
            f"with a smaller shard_size or use resampled=True",
            stacklevel=2,
        )
    stream = ShardStream(
        shards,
        SampleDecoder.for_manifest(manifest, transform),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        resampled=bool(resampled),
        shuffle=shuffle,
        shuffle_buffer=int(cfg["shuffle_buffer"]),
        drop_last=drop_last,
        seed=seed,
        shard_samples=[shard.num_samples for shard in info.shards],
    )
    return ShardLoader(
        stream,
        manifest=manifest,
        directory=directory,
        split=split,
        epoch=epoch,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


# --------------------------------------------------------------------------- map-style


class ShardDataset(Dataset):
    """The samples of one split, held in memory and decoded on access (tiny data, tests).

    Damaged samples are skipped while indexing (``validate`` also decodes each one once), so
    every index is loadable. Items are the per-sample dicts a batch is collated from; the
    default DataLoader collate turns them into the same batch layout as ``build_dataloader``.
    Random crop/flip (train split only) draw from Python's ``random``, which DataLoader seeds
    per worker.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        split: str,
        decoder: SampleDecoder,
        *,
        augment: bool,
        validate: bool = True,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.split = split
        self.decoder = decoder
        self.augment = augment
        self.stats = DataStats()
        self.classes = list(manifest.classes)
        self.segmentation_classes = list(manifest.segmentation_classes)
        keep = set(decoder.fields) | {"__key__", "__shard__"}
        self._raw: list[dict[str, Any]] = []
        for shard in manifest.split(split).shards:
            path = str(directory / shard.name)
            for raw in iter_shard(path, self.stats):
                raw = {k: v for k, v in raw.items() if k in keep}
                if validate:
                    try:
                        decoder(raw)
                    except SampleError as exc:
                        self.stats.record(SkipEvent(exc.kind, path, str(raw["__key__"]), str(exc)))
                        continue
                self._raw.append(raw)
        self.stats.samples = len(self._raw)
        if not self._raw:
            raise DataError(
                f"no valid sample in split {split!r} of {directory}: {self.stats.summary()}"
            )

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.decoder(self._raw[index], random if self.augment else None)


def build_dataset(data_cfg: Any, *, split: str = "train", validate: bool = True) -> ShardDataset:
    """The prepared ``split`` as a map-style dataset (see ``ShardDataset``)."""
    cfg = data_config(data_cfg)
    directory, manifest = load_manifest(cfg)
    transform = transform_from(cfg)
    augment = split == "train"
    if not augment:
        transform = transform.without_augmentation()
    decoder = SampleDecoder.for_manifest(manifest, transform)
    return ShardDataset(directory, manifest, split, decoder, augment=augment, validate=validate)
