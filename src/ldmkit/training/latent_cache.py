"""Latent cache: encode the training split once through the frozen first stage, then
train stage 2 from the stored latents (no image decoding or encoder pass per step).

Layout of ``<run_dir>/latent_cache/``: ``chunk_<NNNNN>.safetensors`` (``latents``:
N×c×h×w float32, ``label``: N int64) with ``chunk_<NNNNN>.json`` (captions, keys),
then ``meta.json`` written last: a cache without it is incomplete and rebuilt.
Latents are stored *unscaled* (the first stage's ``encode`` output); the trainer applies
the pipeline's scale factor. Augmentation (random flips) is fixed at encoding time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.io import atomic_write, atomic_write_text

META = "meta.json"
CHUNK_SIZE = 4096


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
    fingerprint: str,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Encode every batch's ``image`` with ``encode`` and store latents + conditions."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    pending: dict[str, list] = {"latents": [], "label": [], "caption": [], "key": []}
    chunks, total = 0, 0

    def flush() -> None:
        nonlocal chunks
        if not pending["latents"]:
            return
        tensors = {
            "latents": torch.cat(pending["latents"]).contiguous(),
            "label": torch.cat(pending["label"]).contiguous(),
        }
        atomic_write(directory / f"chunk_{chunks:05d}.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write_text(
            directory / f"chunk_{chunks:05d}.json",
            json.dumps({"caption": pending["caption"], "key": pending["key"]}),
        )
        chunks += 1
        for v in pending.values():
            v.clear()

    for batch in tqdm(batches, desc="encoding latent cache", disable=not progress):
        images = batch["image"].to(device)
        latents = encode(images).float().cpu()
        n = latents.shape[0]
        pending["latents"].append(latents)
        labels = batch.get("label")
        pending["label"].append(
            torch.as_tensor(labels, dtype=torch.long) if labels is not None else torch.full((n,), -1)
        )
        pending["caption"].extend(list(batch.get("caption") or [""] * n))
        pending["key"].extend(list(batch.get("__key__") or [""] * n))
        total += n
        if sum(x.shape[0] for x in pending["latents"]) >= CHUNK_SIZE:
            flush()
    flush()
    if total == 0:
        raise ValueError("the latent cache would be empty: the train split yielded no images")
    atomic_write_text(directory / META, json.dumps({"fingerprint": fingerprint, "samples": total, "chunks": chunks}))
    return total


class LatentCache:
    """The cached latents in memory, served as shuffled batches per epoch (and per rank)."""

    def __init__(self, directory: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((directory / META).read_text())
        latents, labels, captions = [], [], []
        for i in range(meta["chunks"]):
            tensors = load_file(str(directory / f"chunk_{i:05d}.safetensors"))
            latents.append(tensors["latents"])
            labels.append(tensors["label"])
            captions.extend(json.loads((directory / f"chunk_{i:05d}.json").read_text())["caption"])
        self.latents: Tensor = torch.cat(latents)
        self.labels: Tensor = torch.cat(labels)
        self.captions: list[str] = captions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batches(self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """One epoch: a seeded permutation, this rank's share, in batches (last one dropped
        when short, so every rank takes the same number of steps)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[rank::world_size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {
                "latent": self.latents[idx],
                "label": self.labels[idx],
                "caption": [self.captions[i] for i in idx.tolist()],
            }
