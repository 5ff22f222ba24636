"""Loaders over prepared shards, built from the ``data`` config: ``build_dataloader`` (a
``ShardLoader``: a DataLoader over a ``ShardStream`` that owns its epoch and its resumable
position) for training, ``build_dataset`` (a map-style ``ShardDataset``) for tiny data; the
config itself (``data_config``: defaults, where the shards are — a folder, a URL, a ``pipe:``
command or a shard list, see ``location`` —, the transform, the manifest).
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import signal
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ldmkit.data.decode import SampleDecoder, SampleError
from ldmkit.data.errors import DataError, ShardShareWarning
from ldmkit.data.location import Location, locate
from ldmkit.data.manifest import Manifest, read_manifest
from ldmkit.data.remote import Retry
from ldmkit.data.shards import iter_shard
from ldmkit.data.stats import DataStats, SkipEvent
from ldmkit.data.stream import ERROR, POSITION, SKIPPED, ShardStream, _Resume
from ldmkit.data.transforms import ImageTransform, parse_background

# --------------------------------------------------------------------------- configuration

CONFIG_DEFAULTS: dict[str, Any] = {
    "source": None,  # the prepare source (used in the "how to prepare" hint)
    "path": None,  # the prepared folder, URL, pipe: command or shard list; default data/<source>
    "manifest": None,  # where manifest.json is, when not beside the shards (location.py)
    "image_size": 32,
    "channels": 3,
    "crop": "center",
    "flip": False,
    "background": [255, 255, 255],
    "shuffle_buffer": 1000,
    "resampled": None,  # None: on when world_size > 1
    "prepare": {},  # extra `ldmkit data prepare` options (hint and ensure_prepared)
    "retries": 5,  # a broken stream (URL, pipe:) is read again this often ...
    "retry_delay": 1.0,  # ... after this many seconds, doubling each time
    "stall_timeout": 120.0,  # a stream that sends nothing for this many seconds is broken too
}


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


def _start_dir() -> Path:
    """The directory the run was started in (Hydra's original cwd)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            from hydra.utils import get_original_cwd

            return Path(get_original_cwd())
    except ImportError:  # pragma: no cover
        pass
    return Path.cwd()


def dataset_dir(cfg: Mapping[str, Any]) -> Path:
    """Where the shards are: ``path``, relative to the directory the run was started in."""
    path = Path(os.path.expanduser(str(cfg["path"] or f"data/{cfg['source']}")))
    return path if path.is_absolute() else _start_dir() / path


def dataset_location(cfg: Mapping[str, Any]) -> Location:
    """Where the shards and the manifest are (``path``, ``manifest``; ``ldmkit.data.location``)."""
    path = cfg.get("path") or f"data/{cfg['source']}"
    return locate(str(path), manifest=cfg.get("manifest"), base=_start_dir())


def retry_from(cfg: Mapping[str, Any]) -> Retry:
    stall = cfg["stall_timeout"]
    return Retry(
        attempts=int(cfg["retries"]),
        delay=float(cfg["retry_delay"]),
        stall_timeout=None if stall is None else float(stall),
    )


def transform_from(cfg: Mapping[str, Any]) -> ImageTransform:
    return ImageTransform(
        image_size=int(cfg["image_size"]),
        channels=int(cfg["channels"]),
        crop=str(cfg["crop"]),
        flip=bool(cfg["flip"]),
        background=parse_background(cfg["background"]),
    )


def load_manifest(cfg: Mapping[str, Any]) -> tuple[Location, Manifest]:
    """Where the data is, and its manifest (read from there)."""
    location = dataset_location(cfg)
    hint = cfg["source"] or "<source>"
    extra = " ".join(f"{k}={v}" for k, v in (cfg["prepare"] or {}).items())
    source = f"{hint} {extra}".strip() if extra else hint
    return location, location.read_manifest(source=source, retry=retry_from(cfg))


def ensure_prepared(data_cfg: Any, *, progress: bool = True) -> Manifest:
    """Prepare the configured dataset if its folder has no manifest yet (single process only:
    in a multi-rank job prepare beforehand with ``ldmkit data prepare``). Data elsewhere
    (a URL, ``pipe:``, a shard list) is only read."""
    cfg = data_config(data_cfg)
    location = dataset_location(cfg)
    if location.folder is None or location.explicit_manifest:
        return load_manifest(cfg)[1]
    directory = location.folder
    try:
        return read_manifest(directory)
    except FileNotFoundError:
        if cfg["source"] is None:
            raise
    from ldmkit.data.prepare import prepare

    options = {"progress": progress, **(cfg["prepare"] or {})}
    return prepare(cfg["source"], directory, **options)


# --------------------------------------------------------------------------- the loader


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

    ``stats`` counts valid and skipped samples and retried streams across workers;
    ``manifest``, ``directory`` (the folder, else ``data.path`` as given), ``split``,
    ``num_samples`` and ``classes`` describe the data. Each ``iter()`` is one epoch
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
        directory: Path | str,
        split: str,
        epoch: int = 0,
        num_samples: int | None = None,  # of the shards read (default: the split's)
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(stream.seed))
        kwargs.setdefault("worker_init_fn", _ignore_signals_in_worker)
        super().__init__(stream, batch_size=None, **kwargs)
        self.stats = DataStats()
        self.manifest = manifest
        self.directory = directory
        self.split = split
        self.num_samples = manifest.split(split).num_samples if num_samples is None else num_samples
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
        while (batch := next(batches_iter, None)) is not None:  # (no hidden reference to it)
            events = batch.pop(SKIPPED, None)
            if events:
                self.stats.merge_events(events)
            if ERROR in batch:  # raised in a worker, passed on as one line
                del batches_iter  # stop the workers now, not when the traceback is collected
                raise DataError(batch[ERROR])
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
        names = "\n".join(stream.names)  # where the shards are may change; their names not
        # nor what they hold: data prepared again under the same names has other checksums
        sums = {shard.name: shard.sha256 for shard in self.manifest.split(self.split).shards}
        content = "\n".join(sums.get(name, "") for name in stream.names)
        return {
            "kind": "shards",
            "split": self.split,
            "shards": hashlib.sha256(names.encode()).hexdigest()[:16],
            "content": hashlib.sha256(content.encode()).hexdigest()[:16],
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
            ("content", "what the shards hold (their sha256 in manifest.json)"),
            ("readers", "the number of DataLoader workers (trainer.num_workers)"),
            ("world_size", "the number of ranks"),
            ("rank", "the rank"),
            ("window", "the shuffle window (data.shuffle_buffer or the shard sizes)"),
            ("resampled", "data.resampled"),
            ("shuffle", "shuffling"),
            ("seed", "the seed"),
        ):
            if key == "content" and key not in state:  # saved before the checksums were compared
                continue
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
    every_rank: bool = False,
) -> ShardLoader:
    """A DataLoader of batch dicts over the prepared shards of ``split``.

    Batches: ``image`` float32 B x C x S x S in [-1, 1], ``label`` int64 B (-1: none),
    ``caption`` list[str] and ``segmentation`` int64 B x S x S where the data has them,
    ``__key__`` list[str]. ``rank``/``world_size`` default to torch.distributed's.
    ``resampled`` (default: the config's, else on when world_size > 1) makes the stream endless.
    ``shuffle`` (default: on for the train split) also switches random crop/flip. The first
    ``iter()`` is epoch ``epoch``; each one advances it. ``every_rank``: each rank must get
    data (training), so one pass over fewer shards than ranks is a :class:`DataError` on every
    rank, not a warning.
    """
    cfg = data_config(data_cfg)
    rank, world_size = _distributed_defaults(rank, world_size)
    location, manifest = load_manifest(cfg)
    directory = location.folder or location.text
    chosen = location.shards(manifest, split)
    if resampled is None:
        resampled = cfg["resampled"] if cfg["resampled"] is not None else world_size > 1
    shuffle = split == "train" if shuffle is None else shuffle
    transform = transform_from(cfg)
    if not shuffle:
        transform = transform.without_augmentation()
    shards = [where for _, where in chosen]
    if every_rank and not resampled and len(shards) < world_size:
        idle = (
            f"rank {len(shards)}"
            if len(shards) == world_size - 1
            else f"ranks {len(shards)} to {world_size - 1}"
        )
        samples = sum(info.num_samples for info, _ in chosen)
        raise DataError(
            f"{directory} split {split!r} has {len(shards)} shard{'s' * (len(shards) != 1)} for {world_size} "
            f"ranks and data.resampled=false deals whole shards to the ranks, so {idle} would have "
            f"nothing to train on: prepare it with more shards (ldmkit data prepare ... shard_size=N, "
            f"at most {max(1, samples // world_size)} samples per shard here) or set data.resampled=true"
        )
    readers = world_size * max(1, num_workers)
    # the training stream only: a held-out split is read whole, idle workers lose nothing there
    if not resampled and len(shards) < readers and (every_rank or split == "train"):
        warnings.warn(
            f"{directory} split {split!r} has {len(shards)} shards for {readers} readers "
            f"({world_size} ranks x {max(1, num_workers)} workers): some get no data; prepare "
            f"with a smaller shard_size or use resampled=True",
            ShardShareWarning,
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
        shard_samples=[info.num_samples for info, _ in chosen],
        names=[info.name for info, _ in chosen],
        shard_bytes=[info.bytes for info, _ in chosen],
        retry=retry_from(cfg),
    )
    return ShardLoader(
        stream,
        manifest=manifest,
        directory=directory,
        split=split,
        epoch=epoch,
        num_samples=sum(info.num_samples for info, _ in chosen),
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
        directory: Path | str,
        manifest: Manifest,
        split: str,
        decoder: SampleDecoder,
        *,
        augment: bool,
        validate: bool = True,
        shards: list[str] | None = None,  # where the split's shards are (default: in directory)
        retry: Retry | None = None,
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
        if shards is None:
            shards = [str(Path(directory) / shard.name) for shard in manifest.split(split).shards]
        for path in shards:
            for raw in iter_shard(path, self.stats, retry=retry):
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
    location, manifest = load_manifest(cfg)
    transform = transform_from(cfg)
    augment = split == "train"
    if not augment:
        transform = transform.without_augmentation()
    decoder = SampleDecoder.for_manifest(manifest, transform)
    return ShardDataset(
        location.folder or location.text, manifest, split, decoder, augment=augment,
        validate=validate, shards=[where for _, where in location.shards(manifest, split)],
        retry=retry_from(cfg),
    )  # fmt: skip
