"""The latent cache's batches per rank (``trainer.latent_cache`` under torchrun): every rank
takes the same number of batches an epoch, and a batch size no rank can fill is one line."""

from __future__ import annotations

import pytest
import torch

from ldmkit.training.errors import TrainingError
from ldmkit.training.latent_cache import CacheLoader, LatentCache, build_cache


def _cache(directory, samples: int) -> LatentCache:
    images = torch.arange(samples, dtype=torch.float32).view(samples, 1, 1, 1)
    batches = [{"image": images[i : i + 5]} for i in range(0, samples, 5)]
    build_cache(directory, batches, lambda x: x, keys=[], fingerprint="f",
                device=torch.device("cpu"), progress=False)  # fmt: skip
    return LatentCache(directory)


def test_every_rank_takes_as_many_batches_and_none_twice(tmp_path):
    cache = _cache(tmp_path / "cache", 22)  # 22 samples on 3 ranks: 8, 7, 7 before
    for epoch in range(3):
        per_rank = [list(cache.batches(4, seed=epoch, rank=r, world_size=3)) for r in range(3)]
        assert [len(b) for b in per_rank] == [1, 1, 1]  # was [2, 1, 1]: the ranks' epochs drift apart
        seen = [int(v) for batches in per_rank for b in batches for v in b["latent"].flatten()]
        assert len(seen) == len(set(seen))


def test_a_batch_size_no_rank_can_fill_is_one_line(tmp_path):
    cache = _cache(tmp_path / "cache", 21)
    CacheLoader(cache, 10, seed=0, rank=1, world_size=2)  # 10 per rank: one batch each
    line = (r"trainer.batch_size=11 is larger than the 10 samples of the latent cache each of the 2 "
            r"ranks takes an epoch \(21 in all\); every batch would be short and is dropped: "
            r"lower trainer.batch_size")  # fmt: skip
    for rank in (0, 1):
        with pytest.raises(TrainingError, match=line):
            CacheLoader(cache, 11, seed=0, rank=rank, world_size=2)
