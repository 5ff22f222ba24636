"""Latent cache: encode the training split once through the frozen first stage, then
train stage 2 from the stored latents (no image decoding or encoder pass per step).

What is stored besides the latents follows the conditioner: every key of its
``data_keys`` (labels, captions, class maps, even the images themselves for an
inpainting conditioner), so the core keeps no list of condition keys.

Layout of ``<run_dir>/latent_cache/``: ``chunk_<NNNNN>.safetensors`` (``latents``:
N×c×h×w float32, plus one tensor per tensor-valued key) with ``chunk_<NNNNN>.json``
(the list-valued keys, e.g. captions, and ``__key__``), then ``meta.json`` written last:
a cache without it is incomplete and rebuilt. Latents are stored *unscaled* (the first
stage's ``encode`` output); the trainer applies the pipeline's scale factor.
Augmentation (random flips) is fixed at encoding time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.errors import LdmkitError
from ldmkit.io import atomic_write, atomic_write_text

META = "meta.json"
CHUNK_SIZE = 4096
LATENTS = "latents"
SAMPLE_KEY = "__key__"


class LatentCacheError(LdmkitError, KeyError):
    """The data lacks a key the conditioner needs (the message names it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
) -> int:
    """Encode every batch's ``image`` with ``encode``; store the latents and ``keys``."""
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
        from safetensors.torch import load_file

        meta = json.loads((directory / META).read_text())
        tensors: dict[str, list[Tensor]] = {}
        lists: dict[str, list[Any]] = {}
        for i in range(meta["chunks"]):
            for key, value in load_file(str(directory / f"chunk_{i:05d}.safetensors")).items():
                tensors.setdefault(key, []).append(value)
            for key, value in json.loads((directory / f"chunk_{i:05d}.json").read_text()).items():
                lists.setdefault(key, []).extend(value)
        self.keys: list[str] = list(meta.get("keys", []))
        self.tensors: dict[str, Tensor] = {k: torch.cat(v) for k, v in tensors.items()}
        self.lists: dict[str, list[Any]] = lists
        self.latents: Tensor = self.tensors[LATENTS]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batches(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """One epoch: a seeded permutation, this rank's share, in batches (last one dropped
        when short, so every rank takes the same number of steps). Batches hold ``latent``
        and the cached keys."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[rank::world_size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            positions = idx.tolist()
            batch: dict[str, Any] = {"latent": self.latents[idx]}
            for key, value in self.tensors.items():
                if key != LATENTS:
                    batch[key] = value[idx]
            for key, value in self.lists.items():
                batch[key] = [value[i] for i in positions]
            yield batch
