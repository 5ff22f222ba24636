"""Latent cache: encode the training split once through the frozen first stage, then
train stage 2 from the stored latents (no image decoding or encoder pass per step).

What is stored besides the latents follows the conditioner: every key of its
``data_keys`` (labels, captions, class maps, even the images themselves for an
inpainting conditioner), so the core keeps no list of condition keys.

Layout of ``<run_dir>/latent_cache/``: ``chunk_<NNNNN>.safetensors`` (``latents``:
N×c×h×w float32, plus one tensor per tensor-valued key) with ``chunk_<NNNNN>.json``
(the list-valued keys, e.g. captions, and ``__key__``), then ``meta.json`` written last:
a cache without it is incomplete and rebuilt, and so is one with a file that does not read
back whole (a truncated chunk: :class:`DamagedCacheError`, one warning). Latents are stored *unscaled* (the first
stage's ``encode`` output); the trainer applies the pipeline's scale factor.
Augmentation (random flips) is fixed at encoding time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.errors import LdmkitError, UnreadableWeightsError
from ldmkit.io import atomic_write, atomic_write_text
from ldmkit.training.errors import TrainingError

META = "meta.json"
CHUNK_SIZE = 4096
LATENTS = "latents"
SAMPLE_KEY = "__key__"


class LatentCacheError(LdmkitError, KeyError):
    """The data lacks a key the conditioner needs (the message names it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedCacheError(LdmkitError, RuntimeError):
    """A file of a complete cache does not read back (the message names it)."""


def is_complete(directory: Path, fingerprint: str) -> bool:
    meta = directory / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text())["fingerprint"] == fingerprint
    except (ValueError, KeyError):
        return False


@torch.no_grad()
def build_cache(
    directory: Path,
    batches: Iterable[Mapping[str, Any]],
    encode: Any,
    *,
    keys: Sequence[str],
    fingerprint: str,
    device: torch.device,
    progress: bool = True,
    check: Callable[[], None] | None = None,
) -> int:
    """Encode every batch's ``image`` with ``encode``; store the latents and ``keys``.

    ``check()`` runs before each batch and may raise to stop (a preemption signal): what was
    written stays incomplete (no ``meta.json``) and is rebuilt by the next run."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    pending: dict[str, list] = {LATENTS: [], SAMPLE_KEY: [], **{k: [] for k in keys}}
    chunks, total, buffered = 0, 0, 0

    def flush() -> None:
        nonlocal chunks, buffered
        if not buffered:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items() if v and isinstance(v[0], Tensor)}
        lists = {k: v for k, v in pending.items() if not (v and isinstance(v[0], Tensor))}
        atomic_write(directory / f"chunk_{chunks:05d}.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write_text(directory / f"chunk_{chunks:05d}.json", json.dumps(lists))
        chunks, buffered = chunks + 1, 0
        for v in pending.values():
            v.clear()

    for batch in tqdm(batches, desc="encoding latent cache", disable=not progress):
        if check is not None:
            check()
        missing = [k for k in keys if k not in batch]
        if missing:
            raise LatentCacheError(
                f"the latent cache stores the conditioner's data keys {list(keys)}, but the data "
                f"has no {missing[0]!r} (its batches have keys {sorted(k for k in batch if not k.startswith('__'))})"
            )
        latents = encode(batch["image"].to(device)).float().cpu()
        n = latents.shape[0]
        pending[LATENTS].append(latents)
        pending[SAMPLE_KEY].extend(batch.get(SAMPLE_KEY) or [""] * n)
        for key in keys:
            value = batch[key]
            if isinstance(value, Tensor):
                pending[key].append(value.cpu())
            else:
                pending[key].extend(value)
        total += n
        buffered += n
        if buffered >= CHUNK_SIZE:
            flush()
    flush()
    if total == 0:
        raise ValueError("the latent cache would be empty: the train split yielded no images")
    meta = {"fingerprint": fingerprint, "samples": total, "chunks": chunks, "keys": list(keys)}
    atomic_write_text(directory / META, json.dumps(meta))
    return total


class LatentCache:
    """The cached latents and condition inputs in memory, served as shuffled batches per
    epoch (and per rank)."""

    def __init__(self, directory: Path) -> None:
        meta = json.loads((directory / META).read_text())
        tensors: dict[str, list[Tensor]] = {}
        lists: dict[str, list[Any]] = {}
        for i in range(meta["chunks"]):
            chunk_tensors, chunk_lists = _read_chunk(directory, i)
            for key, value in chunk_tensors.items():
                tensors.setdefault(key, []).append(value)
            for key, value in chunk_lists.items():
                lists.setdefault(key, []).extend(value)
        self.keys: list[str] = list(meta.get("keys", []))
        self.tensors: dict[str, Tensor] = {k: torch.cat(v) for k, v in tensors.items()}
        self.lists: dict[str, list[Any]] = lists
        self.latents: Tensor = self.tensors[LATENTS]
        if len(self) != meta["samples"]:
            raise DamagedCacheError(f"{directory} holds {len(self)} of its {meta['samples']} latents")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batches(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> Iterator[dict[str, Any]]:
        """One epoch: a seeded permutation, this rank's share, in batches (last one dropped
        when short), from its sample ``start`` on. Every rank's share is equally long (the
        permutation's last ``len % world_size`` samples sit this epoch out), so every rank takes
        the same number of batches. Batches hold ``latent`` and the cached keys."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        order = order[: len(self) // world_size * world_size][rank::world_size]
        for first in range(start, len(order) - batch_size + 1, batch_size):
            idx = order[first : first + batch_size]
            positions = idx.tolist()
            batch: dict[str, Any] = {"latent": self.latents[idx]}
            for key, value in self.tensors.items():
                if key != LATENTS:
                    batch[key] = value[idx]
            for key, value in self.lists.items():
                batch[key] = [value[i] for i in positions]
            yield batch


def _read_chunk(directory: Path, index: int) -> tuple[dict[str, Tensor], dict[str, list[Any]]]:
    """The tensors and lists of chunk ``index``, each with as many rows as its latents."""
    from ldmkit.safetensors_io import read_safetensors

    path = directory / f"chunk_{index:05d}.safetensors"
    try:
        tensors = read_safetensors(path)
    except UnreadableWeightsError as err:
        raise DamagedCacheError(f"{path} is unreadable ({err.reason})") from err
    path = path.with_suffix(".json")
    try:
        lists = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedCacheError(f"{path} is unreadable ({err})") from err
    rows = {len(v) for v in (*tensors.values(), *lists.values())}
    if LATENTS not in tensors or len(rows) != 1:
        raise DamagedCacheError(f"{path.with_suffix('.safetensors')} and {path.name} do not hold one row per sample")
    return tensors, lists


class CacheLoader:
    """The cache as a resumable training loader: each ``iter()`` is epoch ``epoch`` (at first
    the one it was made for; then it advances), in the order :meth:`LatentCache.batches` gives for ``seed + epoch``. The order
    is a pure function of the seed and the epoch, so the position is (epoch, samples handed
    out) and resuming it is exact without reading anything twice — with another batch size
    too, which goes on from the same sample."""

    def __init__(self, cache: LatentCache, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 epoch: int = 0) -> None:
        share = len(cache) // world_size
        if batch_size > share:  # every rank would find no batch: say why, on every rank alike
            each = f" each of the {world_size} ranks takes an epoch ({len(cache)} in all)" if world_size > 1 else ""
            raise TrainingError(
                f"trainer.batch_size={batch_size} is larger than the {share} samples of the latent cache"
                f"{each}; every batch would be short and is dropped: lower trainer.batch_size"
            )
        self.cache, self.batch_size, self.seed = cache, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self._position = {"epoch": epoch, "offset": 0}
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        self.epoch += 1
        resume = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        self._resume = None
        start = resume["offset"] if resume else 0
        self._position = {"epoch": epoch, "offset": start}
        for batch in self.cache.batches(self.batch_size, seed=self.seed + epoch, rank=self.rank,
                                        world_size=self.world_size, start=start):
            self._position["offset"] += self.batch_size
            yield batch

    def _identity(self) -> dict[str, Any]:
        return {"kind": "latent_cache", "samples": len(self.cache), "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), **self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> str | None:
        epoch = int(state.get("epoch", 0))
        self.epoch = epoch
        mine = self._identity()
        changed = [f"{k} changed from {state.get(k)} to {v}" for k, v in mine.items()
                   if k != "batch_size" and state.get(k) != v]  # fmt: skip
        if changed:
            return (f"the data position cannot be restored exactly: {'; '.join(changed)}; "
                    f"epoch {epoch} starts again from its beginning")
        # samples handed out (checkpoints before counted batches)
        offset = state["offset"] if "offset" in state else int(state["batches"]) * int(state["batch_size"])
        self._resume = {"epoch": epoch, "offset": int(offset)}
        return None
