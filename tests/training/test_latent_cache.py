"""The latent cache's batches per rank (``trainer.latent_cache`` under torchrun): every rank
takes the same number of batches an epoch, and a batch size no rank can fill is one line."""

from __future__ import annotations

import shutil

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


def test_a_changed_batch_size_goes_on_where_the_epoch_was(tmp_path):
    """docs/reliability.md: on resume the position is counted in samples, so a new batch size
    neither repeats nor skips any (the cache restarted its epoch, with a warning)."""
    cache = _cache(tmp_path / "cache", 12)
    before = CacheLoader(cache, 2, seed=0)
    batches = iter(before)
    seen = [int(v) for _ in range(3) for v in next(batches)["latent"].flatten()]
    after = CacheLoader(cache, 3, seed=0)
    assert after.load_state_dict(before.state_dict()) is None
    rest = [int(v) for b in after for v in b["latent"].flatten()]
    assert len(rest) == 6 and sorted(seen + rest) == list(range(12))
    # and the new loader saves its own position: resumed again, it goes on from there
    again = CacheLoader(cache, 3, seed=0)
    again.load_state_dict(after.state_dict())
    assert list(again) == []  # the epoch was used up
    assert [int(v) for b in again for v in b["latent"].flatten()] != []  # the next one is whole


def test_a_batch_size_no_rank_can_fill_is_one_line(tmp_path):
    cache = _cache(tmp_path / "cache", 21)
    CacheLoader(cache, 10, seed=0, rank=1, world_size=2)  # 10 per rank: one batch each
    line = (r"trainer.batch_size=11 is larger than the 10 samples of the latent cache each of the 2 "
            r"ranks takes an epoch \(21 in all\); every batch would be short and is dropped: "
            r"lower trainer.batch_size")  # fmt: skip
    for rank in (0, 1):
        with pytest.raises(TrainingError, match=line):
            CacheLoader(cache, 11, seed=0, rank=rank, world_size=2)


def test_the_cache_follows_the_first_stage_weights_the_run_trains_on(tmp_path):
    """The cache was keyed by the first stage's config alone: a first_stage.checkpoint folder
    trained further since the cache was built gave a fresh run the old encoder's latents
    (silently). It is keyed by the weights the run trains with — after a resume, the
    checkpoint's, so a resumed run keeps the cache its first steps used."""
    from safetensors.torch import load_file

    from ldmkit.config import compose_config
    from ldmkit.data import prepare
    from ldmkit.training import train
    from tests.data.conftest import make_image_folder

    make_image_folder(tmp_path / "images", per_class=2, size=(16, 16))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "images"), shard_size=6, progress=False)
    data = ["data=image_folder", f"data.path={tmp_path / 'shards'}", "image_size=16", "trainer.num_threads=1",
            "first_stage=kl_tiny", "trainer.val_split=null", "trainer.sample_every=0"]
    ae, ldm = tmp_path / "ae", tmp_path / "ldm"

    def stage_one(steps):
        train(compose_config(["stage=autoencoder", "trainer=autoencoder_tiny", *data, f"run_dir={ae}",
                              f"trainer.max_steps={steps}"]))

    def stage_two(steps):
        train(compose_config(["stage=ldm", "trainer=ldm_tiny", "denoiser=unet_tiny", *data, f"run_dir={ldm}",
                              f"first_stage.checkpoint={ae}", "trainer.latent_cache=true",
                              f"trainer.max_steps={steps}", "trainer.checkpoint_every=1"]))

    def cached():
        return load_file(str(ldm / "latent_cache" / "chunk_00000.safetensors"))["latents"]

    stage_one(1)
    stage_two(1)
    first = cached()
    stage_one(2)  # the first stage's folder now holds other weights
    stage_two(2)  # a resume: the checkpoint's first stage, the cache it was encoded with
    assert torch.equal(cached(), first)
    for folder in ("checkpoints", "pipeline"):  # start over in the same folder
        shutil.rmtree(ldm / folder)
    stage_two(1)
    assert not torch.equal(cached(), first)
