"""torch.distributed as training uses it: the process group ``torchrun`` asks for, this
process's rank, and the few collectives a run needs. Each helper is a no-op (or returns its
own value) in a single process, so the trainer calls them without asking first.

Every rank runs the same steps on its own data; rank 0 alone writes (checkpoints, logs,
grids) and decides what all ranks must agree on (the run folder's lock, the latent scale
factor); :func:`gather` brings every rank's random streams and data position to rank 0's
checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


#: what gloo's TCP transport says when the process at the other end of a connection is gone
_GLOO_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_connection(error: BaseException) -> bool:
    """Whether ``error`` is the communication layer losing another rank: torch.distributed's
    ``DistError`` family (backend, network, store) or gloo's closed or reset connection."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    message = str(error)
    return (
        isinstance(error, RuntimeError)
        and "gloo" in message
        and any(m in message for m in _GLOO_LOST)
    )


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed_process_group() -> Iterator[None]:
    """Initialize torch.distributed from torchrun's environment, if it asks for it (any
    ``torchrun`` launch, one process included: NCCL on CUDA, gloo on CPU, each process on
    the GPU of its ``LOCAL_RANK``), and tear it down afterwards."""
    import torch.distributed as dist

    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not wanted or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def no_sync(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Backward passes inside keep their gradients local to this rank: each
    ``DistributedDataParallel`` of ``models`` under its ``no_sync()``, and every FSDP2 unit
    within them with ``set_requires_gradient_sync(False)`` (other modules, and a single
    process, as they are). The next backward outside reduces the sum (gradient accumulation)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    with contextlib.ExitStack() as stack:
        for model in models:
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(model.no_sync())
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _group_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if _group_size() == 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` overwritten, in place, with rank 0's values."""
    if _group_size() > 1:
        import torch.distributed as dist

        dist.broadcast(tensor, src=0)
    return tensor


def gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    size = _group_size()
    if size == 1:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * size
    dist.all_gather_object(values, value)
    return values
