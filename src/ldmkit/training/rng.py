"""The random streams of a training run, kept apart so that resuming replays them exactly.

* the global generators (torch CPU and CUDA, Python's ``random``, NumPy): what code we do not
  own draws from inside a step (a KL posterior sample, VQ dead-code restarts). Only training
  steps may move them; their state after a step is in every checkpoint;
* named ``torch.Generator``s a stage owns, one per consumer (stage 2: condition dropout),
  seeded from ``(seed, name, rank)`` and checkpointed;
* per-sample generators (:func:`sample_generators`, stage 2: timesteps and noise), seeded from
  the sample's place in the step's global batch, so what a sample draws does not depend on
  how many ranks share the batch; they hold no state to checkpoint;
* everything else that wants randomness — image grids, validation, data loading — runs in
  :func:`isolated_rng` or draws from its own generator, so it can run at any step, or not at
  all, without moving the training streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``(seed, "grids")``): distinct parts give
    unrelated streams, the same parts the same stream on every machine."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_global_rng_state(state: Mapping[str, Any]) -> None:
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
    """Run a block and put the global generators back as they were."""
    state = global_rng_state()
    try:
        yield
    finally:
        set_global_rng_state(state)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block on global generators seeded with ``seed``, then restore them: what the
    block draws depends on ``seed`` only, and the training streams do not move."""
    with preserved_rng():
        seed_everything(seed)
        yield


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_generators(seed: int, name: str, step: int, first: int, count: int) -> list[torch.Generator]:
    """One generator for each of ``count`` samples, the first at index ``first`` of step
    ``step``'s global batch (rank r of a batch of B per rank starts at r * B): sample i draws
    from ``(seed, name, step, i)`` whichever rank holds it, so N ranks of B samples draw what
    one process of N * B samples draws."""
    return [generator(stream_seed(seed, name, step, first + i)) for i in range(count)]
