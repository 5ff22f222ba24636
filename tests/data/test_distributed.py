"""Ranks x DataLoader workers read disjoint shards that together cover the split."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from ldmkit.data import build_dataloader, prepare

from .conftest import loader_cfg, make_image_folder


@pytest.fixture
def eight_shards(tmp_path):
    root = tmp_path / "images"
    make_image_folder(root, per_class=8)  # 24 images
    out = tmp_path / "shards"
    prepare("image_folder", out, path=str(root), shard_size=3, progress=False)  # 8 shards
    return out


def test_two_ranks_two_workers_disjoint_and_covering(eight_shards):
    per_rank = {}
    for rank in (0, 1):
        loader = build_dataloader(
            loader_cfg(eight_shards), batch_size=2, rank=rank, world_size=2, num_workers=2,
            resampled=False, seed=5,
        )  # fmt: skip
        keys = [k for batch in loader for k in batch["__key__"]]
        assert len(keys) == len(set(keys)), f"rank {rank} saw a sample twice"
        per_rank[rank] = set(keys)
        assert loader.stats.samples == len(keys)
    assert per_rank[0].isdisjoint(per_rank[1])
    all_keys = {f"train-{i:07d}" for i in range(24)}
    assert per_rank[0] | per_rank[1] == all_keys
    assert len(per_rank[0]) == len(per_rank[1]) == 12  # 4 shards of 3 each


def test_each_rank_gets_whole_shards(eight_shards):
    """A rank's samples are exactly the union of some shards (sharding is by shard)."""
    shard_of = {f"train-{i:07d}": i // 3 for i in range(24)}  # written in order, 3 per shard
    loader = build_dataloader(
        loader_cfg(eight_shards), batch_size=4, rank=1, world_size=2, num_workers=2, resampled=False
    )
    shards = Counter(shard_of[k] for batch in loader for k in batch["__key__"])
    assert len(shards) == 4 and set(shards.values()) == {3}


def test_resampled_stream_is_endless_and_seeded_per_rank(eight_shards):
    def first_keys(rank, seed):
        loader = build_dataloader(
            loader_cfg(eight_shards), batch_size=8, rank=rank, world_size=2, resampled=True,
            seed=seed,
        )  # fmt: skip
        batches = list(itertools.islice(iter(loader), 10))  # 80 samples from 24: endless
        assert all(len(b["__key__"]) == 8 for b in batches)
        return [k for b in batches for k in b["__key__"]]

    a = first_keys(0, seed=0)
    assert a == first_keys(0, seed=0)
    assert a != first_keys(1, seed=0)
    assert a != first_keys(0, seed=1)


def test_world_size_defaults_to_resampled(eight_shards):
    loader = build_dataloader(loader_cfg(eight_shards), batch_size=2, rank=0, world_size=2)
    assert loader.dataset.resampled
    loader = build_dataloader(loader_cfg(eight_shards), batch_size=2)
    assert not loader.dataset.resampled and loader.dataset.world_size == 1


def test_too_few_shards_warns(eight_shards):
    with pytest.warns(UserWarning, match="8 shards for 10 readers"):
        build_dataloader(
            loader_cfg(eight_shards), batch_size=2, rank=0, world_size=5, num_workers=2,
            resampled=False,
        )  # fmt: skip
