"""The train split's loader owns its epoch (ldmkit.training.data): a resumable loader is made
once, at the training state's epoch; each iter() advances its epoch; on resume its
load_state_dict puts it back where the checkpoint left it. Nothing sets its epoch from
outside, and a loader that does not keep its epoch is refused in one line."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.training import TrainingError, train

PER_EPOCH = 3  # batches per epoch


class EpochLoader:
    """A resumable loader of PER_EPOCH batches per epoch (its order a function of the epoch)
    that records the epoch it was made for, each epoch it reads and each epoch set on it
    from outside."""

    def __init__(self, epoch: int, *, advances: bool = True) -> None:
        self._epoch, self.advances = epoch, advances
        self.made_at, self.read, self.set_from_outside = epoch, [], []
        self._position = {"epoch": epoch, "batches": 0}
        self._resume: dict | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.set_from_outside.append(value)
        self._epoch = value

    def __iter__(self):
        epoch = self._epoch
        self._epoch += int(self.advances)
        start = self._resume["batches"] if self._resume and self._resume["epoch"] == epoch else 0
        self._resume = None
        self.read.append(epoch)
        images = torch.rand(PER_EPOCH, 2, 3, 16, 16, generator=torch.Generator().manual_seed(epoch))
        for index in range(start, PER_EPOCH):
            self._position = {"epoch": epoch, "batches": index + 1}
            yield {"image": images[index] * 2 - 1}

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._epoch = state["epoch"]
        self._resume = dict(state)


def _factory(made: list[EpochLoader], **kwargs):
    def data(split, epoch):
        if split != "train":
            return [{"image": torch.zeros(2, 3, 16, 16)}]
        made.append(EpochLoader(epoch, **kwargs))
        return made[-1]

    return data


def _cfg(tiny_cfg, steps: int, run: str):
    return tiny_cfg(f"trainer.max_steps={steps}", "trainer.checkpoint_every=4", "trainer.val_every=0",
                    "trainer.sample_every=0", run=run)  # fmt: skip


def test_a_resumable_loader_is_made_once_and_advances_its_own_epoch(tiny_cfg):
    made: list[EpochLoader] = []
    train(_cfg(tiny_cfg, 8, "run"), data=_factory(made))  # 8 steps: epochs 0, 1 and part of 2
    assert [loader.made_at for loader in made] == [0]
    assert made[0].read == [0, 1, 2] and made[0].set_from_outside == []


def test_resuming_puts_the_loader_back_where_the_checkpoint_left_it(tiny_cfg):
    straight: list[EpochLoader] = []
    run = train(_cfg(tiny_cfg, 8, "straight"), data=_factory(straight))
    first: list[EpochLoader] = []
    train(_cfg(tiny_cfg, 4, "resumed"), data=_factory(first))  # stops 1 batch into epoch 1
    second: list[EpochLoader] = []
    resumed = train(_cfg(tiny_cfg, 8, "resumed"), data=_factory(second))
    assert [loader.made_at for loader in second] == [1]  # made at the state's epoch
    assert second[0].read == [1, 2] and second[0].set_from_outside == []
    a = load_file(run / "checkpoints/step_000000008/model.safetensors")
    b = load_file(resumed / "checkpoints/step_000000008/model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_resumable_loader_that_does_not_advance_its_epoch_is_refused(tiny_cfg):
    with pytest.raises(TrainingError) as err:
        train(_cfg(tiny_cfg, 8, "run"), data=_factory([], advances=False))
    assert str(err.value) == (
        "the train loader (EpochLoader) is at epoch 0 after its previous epoch, where training is "
        "at epoch 1: a resumable loader starts at the epoch make_loader gives it and each iter() "
        "advances its epoch by one"
    )


def test_a_split_other_than_train_is_read_whole_on_any_rank(tmp_path, monkeypatch):
    """Before: rank 0's validation under DDP read a resampled stream over its share of the
    val shards, so validation changed with the number of ranks. Now only train is dealt."""
    from omegaconf import OmegaConf

    from ldmkit.data import loader, prepare
    from ldmkit.training.data import configured_loader
    from tests.data.conftest import loader_cfg, make_image_folder

    make_image_folder(tmp_path / "images", per_class=4, size=(10, 10))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=2,
            val_fraction=0.5, progress=False)  # fmt: skip
    cfg = OmegaConf.create({"data": loader_cfg(tmp_path / "shards")})
    options = {"batch_size": 2, "num_workers": 0}

    def keys(split):  # at most 10 batches: a resampled stream never ends
        batches = itertools.islice(configured_loader(cfg, options, split, 0, seed=0), 10)
        return [k for batch in batches for k in batch["__key__"]]

    alone = {"val": keys("val")}
    real = loader._distributed_defaults
    monkeypatch.setattr(loader, "_distributed_defaults",
                        lambda rank, world: real(1 if rank is None else rank, 2 if world is None else world))  # fmt: skip
    assert keys("val") == alone["val"] and len(alone["val"]) == 6
