"""Where a run's batches come from, and where in them the run is.

A stage's ``make_loader(split, epoch)`` (:meth:`ldmkit.training.engine.Trainer.make_loader`)
gives the batches of a split from an epoch on. :class:`TrainBatches` turns the train split
into the one stream the loop reads, epoch after epoch, and keeps the training state's data
position (``epoch``, ``batches_in_epoch``):

* a *resumable* loader — ``state_dict()``, ``load_state_dict(state) -> None | reason`` and an
  ``epoch`` attribute, as :class:`ldmkit.data.ShardLoader` and the latent cache's loader
  have — owns its epoch: it is made once, at the state's epoch; each ``iter()`` is one epoch
  and advances it; ``load_state_dict`` puts it back where a checkpoint left it. Nobody else
  sets its epoch. Resuming it is exact by position;
* any other iterable is asked for anew for each epoch, and a resumed epoch is replayed from
  its start up to the saved batch count (exact when its order is a pure function of the
  epoch).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig

from ldmkit.config import AUTO
from ldmkit.training.errors import TrainingError, TrainingWarning
from ldmkit.training.state import TrainingState

Batch = Mapping[str, Any]
# (split, epoch) -> an iterable of batch dicts; lets tests and notebooks train on
# in-memory data instead of the configured dataset
DataFactory = Callable[[str, int], Iterable[Batch]]


def is_resumable(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


def configured_loader(
    cfg: DictConfig, options: Mapping[str, Any], split: str, epoch: int, seed: int
):
    """A :class:`ldmkit.data.ShardLoader` (resumable) over ``cfg.data``'s ``split``, at
    ``epoch``: the train split dealt to the ranks, any other one whole to whichever rank reads
    it (validation sees the same batches whatever the number of ranks)."""
    from ldmkit.data import build_dataloader

    train = split == "train"
    return build_dataloader(
        cfg.data,
        batch_size=int(options["batch_size"]),
        split=split,
        num_workers=int(options["num_workers"]),
        seed=seed,
        epoch=epoch,
        every_rank=train,
        **({} if train else {"rank": 0, "world_size": 1}),
    )


def data_label(cfg: DictConfig) -> str:
    """How messages name the configured data (its source, else the whole node)."""
    data = cfg.get("data")
    return str(data.get("source", data)) if isinstance(data, Mapping | DictConfig) else str(data)


def validation_split(cfg: DictConfig, split: str, *, factory: bool = False) -> str | None:
    """The split of ``cfg.data`` validation reads: ``split`` when the data has it; for
    ``auto`` (the default), the data's held-out split (``val``, else ``test``). None when
    there is none, with one warning, so a run on data without it trains on instead of
    failing at validation. A ``data(split, epoch)`` factory (``factory``) has no manifest:
    it is asked for ``split``, ``test`` for ``auto``."""
    from ldmkit.data.loader import data_config, load_manifest

    if factory:
        return "test" if split == AUTO else split

    _, manifest = load_manifest(data_config(cfg.data))
    has = ", ".join(sorted(manifest.splits))
    if split == AUTO:
        held_out = manifest.facts()["val_split"]
        if held_out is None:
            warnings.warn(
                f"data={data_label(cfg)} has no held-out split (val or test; it has {has}): validation "
                "is skipped and grids use training batches. Prepare it with val_fraction=... for a val split",
                TrainingWarning,
                stacklevel=3,
            )
        return held_out
    if split in manifest.splits:
        return split
    warnings.warn(
        f"trainer.val_split={split!r} is not in data={data_label(cfg)} (it has {has}); validation is "
        "skipped and grids use training batches. Prepare the data with val_fraction=... or set "
        "trainer.val_split",
        TrainingWarning,
        stacklevel=3,
    )
    return None


def first_batches(loader: Iterable[Batch], limit: int) -> list[Batch]:
    batches: list[Batch] = []
    if limit > 0:
        for batch in loader:
            batches.append(batch)
            if len(batches) >= limit:
                break
    return batches


class TrainBatches:
    """The train split as one endless stream of batches (iterate it once), keeping
    ``state.epoch`` and ``state.batches_in_epoch`` and, after a resume, continuing at
    ``state.data_position``. :meth:`position` is what a checkpoint stores of it."""

    def __init__(
        self,
        make_loader: Callable[[str, int], Iterable[Batch]],
        state: TrainingState,
        *,
        label: str,
    ) -> None:
        self._make_loader = make_loader
        self.state = state
        self.label = label
        self._kept: Any = None  # the resumable loader, made once and reused for every epoch
        self._in_use: Any = None  # the resumable loader of the current epoch, if any

    def position(self) -> dict[str, Any]:
        """This rank's data position after the last batch handed out."""
        return {"loader": self._in_use.state_dict() if self._in_use is not None else None}

    def __iter__(self) -> Iterator[Batch]:
        state = self.state
        restore, state.data_position = state.data_position, None
        while True:
            loader = self._loader(state.epoch)
            resumable = is_resumable(loader)
            self._in_use = loader if resumable else None
            skip = 0
            if restore is not None:  # the first epoch after a resume
                saved = restore.get("loader")
                if resumable and saved is not None:
                    note = loader.load_state_dict(saved)
                    if note:
                        warnings.warn(
                            f"resuming at step {state.step}: {note}", TrainingWarning, stacklevel=2
                        )
                        state.batches_in_epoch = 0
                else:  # replay the epoch's order up to the saved position
                    skip = state.batches_in_epoch
                restore = None
            resumed_mid_epoch = state.batches_in_epoch > 0
            produced = 0
            for index, batch in enumerate(loader):
                produced += 1
                if index < skip:
                    continue
                state.batches_in_epoch = state.batches_in_epoch + 1 if resumable else index + 1
                yield batch
            if produced == 0 and not resumed_mid_epoch:
                raise TrainingError(f"the train split of data={self.label} yielded no batches")
            state.epoch += 1
            state.batches_in_epoch = 0

    def _loader(self, epoch: int) -> Iterable[Batch]:
        if self._kept is not None:
            _check_epoch(self._kept, epoch, "after its previous epoch")
            return self._kept
        loader = self._make_loader("train", epoch)
        if is_resumable(loader) and hasattr(loader, "epoch"):
            _check_epoch(loader, epoch, f"from make_loader('train', {epoch})")
            self._kept = loader
        return loader


def _check_epoch(loader: Any, epoch: int, when: str) -> None:
    """A resumable loader owns its epoch; one that does not keep it would silently repeat an
    epoch's order."""
    if loader.epoch != epoch:
        raise TrainingError(
            f"the train loader ({type(loader).__name__}) is at epoch {loader.epoch} {when}, where "
            f"training is at epoch {epoch}: a resumable loader starts at the epoch make_loader "
            f"gives it and each iter() advances its epoch by one"
        )
