"""The stream of prepared shards for training: which shards each rank and worker reads, in
which order, and where it is (a position a checkpoint can continue from exactly).

Stream (``ShardStream``, through ``build_dataloader``)::

    shard list --(seeded shuffle per epoch | resampling with replacement)
      -> split by node (rank) -> split by DataLoader worker
      -> windows of shards (about data.shuffle_buffer samples each)
      -> read a window's tar members, group by key (damage skipped and recorded)
      -> permute the window (seeded)
      -> decode PNG + label/caption/class map, transform       (decode.py; corrupt samples recorded)
      -> batch in the worker (decode.collate)

Shards are local files (read with ldmkit's tar reader) or locations webdataset's ``gopen``
opens (``http(s)://``, ``pipe:CMD``): those are parsed by the same reader from the stream, and
a transfer that breaks off is read again, passing over the samples already read
(``shards.iter_shard``), so a stream gives exactly what the file would.

Every step is a pure function of (seed, epoch, rank, worker, window, index), so the loader's
position — each worker's (window, index) — is all a checkpoint needs to continue an epoch
exactly (``ShardLoader.state_dict`` / ``load_state_dict``). Each worker's skip events ride
along with its next batch (or an event-only message at its end) to the main process, where
``loader.stats`` (a ``DataStats``) counts them; the worker has already logged each one with its
shard and key. Retried streams ride along likewise; a ``DataError`` in a worker (a stream that
failed for good) reaches the main process as a message, raised there as one line.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ldmkit.data.decode import SampleDecoder, SampleError, collate
from ldmkit.data.errors import DataError
from ldmkit.data.remote import Retry
from ldmkit.data.shards import iter_shard
from ldmkit.data.stats import DataStats, RetryEvent, SkipEvent

SKIPPED = "__skipped__"  # batch key carrying a worker's skip events; removed before the caller
POSITION = "__position__"  # batch key: (worker, window, index) after the batch; removed likewise
ERROR = "__error__"  # message key: the DataError that ended a worker's stream


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
    events: list[SkipEvent | RetryEvent] = field(default_factory=list)
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
        names: list[str] | None = None,
        shard_bytes: list[int] | None = None,
        retry: Retry | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = list(shards)  # where each shard is: a path, URL or pipe: command
        # what the position names (the manifest's names): the same shards elsewhere resume
        self.names = list(names) if names is not None else [Path(s).name for s in self.shards]
        self._bytes = dict(zip(self.shards, shard_bytes or (), strict=False))
        self.retry = retry or Retry()
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
            raws.extend(
                iter_shard(
                    shard,
                    ctx.stats,
                    on_skip=partial(ctx.skip, log=False),
                    on_retry=ctx.events.append,
                    retry=self.retry,
                    expected_bytes=self._bytes.get(shard),
                )
            )
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
        try:
            for position, sample in samples:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield emit(batch, position)
                    batch = []
        except DataError as exc:
            yield {**emit([], None), ERROR: str(exc)}
            return
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
