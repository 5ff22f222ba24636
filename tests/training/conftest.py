from __future__ import annotations

import pytest
import torch

from ldmkit.config import compose_config


def _image_data(n: int = 24, batch_size: int = 4, channels: int = 3, size: int = 16, seed: int = 0):
    """A deterministic in-memory dataset as ``data(split, epoch)`` (a different fixed order
    per epoch, like a seeded shuffling loader)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, channels, size, size, generator=gen) * 2 - 1

    def data(split, epoch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * epoch + (split == "test")))
        return [{"image": images[order[i : i + batch_size]]} for i in range(0, n, batch_size)]

    return data


@pytest.fixture
def tiny_cfg(tmp_path):
    # one thread: tiny models gain nothing from more, and a busy 2-core machine makes
    # OpenMP threads spin; the trainer sets it process-wide, so restore it afterwards
    threads = torch.get_num_threads()

    def make(*overrides, run="run"):
        return compose_config([
            "stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
            f"run_dir={tmp_path / run}", "trainer.tensorboard=false", "trainer.num_threads=1",
            *overrides,
        ])

    yield make
    torch.set_num_threads(threads)


@pytest.fixture
def image_data():
    return _image_data
