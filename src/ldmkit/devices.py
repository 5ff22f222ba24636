"""Devices: a device name resolved to one that exists here, and the memory a device has free,
so that work which cannot fit is refused in one line before it starts (a model config whose
weights exceed memory, a sample size whose activations do).

:func:`build_within_memory` counts the bytes a constructor asks ``torch.empty`` & co. for
and stops it before the allocation that would pass the free memory. Estimates run code on the
``meta`` device: tensors with shapes and no storage, so that a model of a terabyte is "built",
and a forward at 100,000 pixels is "run", in milliseconds and without memory
(:func:`meta_build_bytes` counts what a constructor allocates; :func:`meta_peak_bytes`
follows the tensors a call creates and frees and returns the most alive at once). The first
meta operation of a process imports ``torch._dynamo`` (about a second), so these run only
where a check needs them.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ldmkit.errors import LdmkitError

__all__ = [
    "DeviceError",
    "InsufficientMemoryError",
    "available_memory",
    "build_within_memory",
    "check_fits",
    "format_bytes",
    "meta_build_bytes",
    "meta_peak_bytes",
    "resolve_device",
    "sampling_device",
]


class DeviceError(LdmkitError, ValueError):
    """A device that is not one, or not on this machine (the message names the key)."""


class InsufficientMemoryError(LdmkitError, MemoryError):
    """Work refused before it starts: what it needs (estimated) and what is free, in bytes."""

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed, self.available = needed, available

    def __reduce__(self):
        return (_rebuild_memory_error, (str(self), self.needed, self.available))


def _rebuild_memory_error(message: str, needed: int, available: int) -> InsufficientMemoryError:
    return InsufficientMemoryError(message, needed=needed, available=available)


def _shown(key: str, name: Any) -> str:
    """``trainer.device='cuda:7'`` for a config key, ``--device 'cuda:7'`` for a flag."""
    return f"{key} {name!r}" if key.startswith("-") else f"{key}={name!r}"


def resolve_device(name: str | torch.device | None, key: str = "device") -> torch.device:
    """``auto`` (or None): the GPU of this process's local rank when CUDA is available, else
    the CPU; any other name must be a device of this machine. :class:`DeviceError` names
    ``key`` (a config key or a flag) and says what there is instead."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            # under torchrun each process takes the GPU of its local rank
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(
            f"{_shown(key, name)}: expected auto or a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this PyTorch is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU or driver was found"
            )
            raise DeviceError(f"{_shown(key, name)}: CUDA is not available here ({why}); use cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise DeviceError(
                f"{_shown(key, name)}: this machine has {count} CUDA device{'s' * (count != 1)} ({have})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{_shown(key, name)}: MPS is not available here; use cpu or auto")
    return device


# -- memory ---------------------------------------------------------------------------------
def sampling_device(name: str, flag: str = "--device") -> str:
    """The device ``ldmkit sample`` and ``ldmkit demo`` run on, as they record it: ``auto`` is
    ``cuda`` when available, else ``cpu``; any other name must be a device of this machine
    (:func:`resolve_device`, whose error names ``flag``)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(resolve_device(name, flag))


def format_bytes(n: float) -> str:
    """``1.2 GB`` (powers of 1000, as disks and ``free -h --si`` count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """What the process's cgroup (a container's memory limit) still allows, when limited: the
    limit less the usage, not counting inactive file cache (reclaimed when needed, as
    ``docker stats`` counts it)."""
    for folder, limit_name, usage_name, cache_key in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),  # cgroup v2
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            limit = Path(folder, limit_name).read_text().strip()
            usage = int(Path(folder, usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max", or v1's huge number: no limit
            return None
        cache = 0
        try:
            for line in Path(folder, "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - max(0, usage - cache))
    return None


def available_memory(device: str | torch.device = "cpu") -> tuple[int, str] | None:
    """``(bytes, how to say it)`` that new tensors on ``device`` can still take: for the CPU, the
    kernel's MemAvailable (or what a container's cgroup limit leaves, if less); for a CUDA
    GPU, its free memory plus what PyTorch holds cached but unused. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return free + cached, f"is free on cuda:{index}"
    if device.type != "cpu":
        return None
    sizes = [s for s in (_meminfo_available(), _cgroup_room()) if s is not None]
    if not sizes and hasattr(os, "sysconf"):
        try:
            sizes = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError):
            return None
    return (min(sizes), "of memory is available here") if sizes else None


def check_fits(needed: int, device: str | torch.device, what: str, advice: str = "") -> None:
    """Raise :class:`InsufficientMemoryError` when ``needed`` bytes exceed what ``device`` has
    free: "``what`` needs 26.2 GB, but 21.9 GB of memory is available here``advice``"."""
    room = available_memory(device)
    if room is None or needed <= room[0]:
        return
    raise InsufficientMemoryError(
        f"{what} needs {format_bytes(needed)}, but {format_bytes(room[0])} {room[1]}{advice}",
        needed=needed,
        available=room[0],
    )


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_build_bytes(build: Callable[[], Any]) -> tuple[Any, int, int] | None:
    """``(the object, bytes and number of elements of its parameters and buffers)`` with
    ``build()`` run on the meta device (nothing allocated); None when ``build`` cannot run
    there (it reads files, or refuses meta tensors) or makes no module."""
    try:
        with torch.device("meta"):
            obj = build()
    except Exception:  # noqa: BLE001 - any failure here is the real build's to report
        return None
    if not isinstance(obj, nn.Module):
        return None
    unique = {id(t): t for t in chain(obj.parameters(), obj.buffers())}.values()
    return obj, _tensor_bytes(unique), sum(t.numel() for t in unique)


# factories whose arguments give the size of what they allocate: (*size) or (size, ...)
_SIZED_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn}
_SIZE_FIRST_FACTORIES = {torch.full, torch.empty_strided}


def _factory_bytes(func: Any, args: tuple, kwargs: dict) -> int:
    """The bytes a ``torch.empty(...)``-like call makes on the CPU (0 for other calls)."""
    if func not in _SIZED_FACTORIES and func not in _SIZE_FIRST_FACTORIES:
        return 0
    if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
        return 0
    size = kwargs.get("size", args[0] if func in _SIZE_FIRST_FACTORIES and args else args)
    if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
        size = size[0]
    try:
        numel = math.prod(int(n) for n in size)
    except (TypeError, ValueError):
        return 0
    return numel * (kwargs.get("dtype") or torch.get_default_dtype()).itemsize


class _OverLimit(BaseException):  # not an Exception: a constructor's `except Exception` lets it by
    pass


class _AllocationLimit(TorchFunctionMode):
    """Adds up what factory calls allocate on the CPU; raises :class:`_OverLimit` before the
    call that would pass ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.total = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.total += _factory_bytes(func, args, kwargs)
        if self.total > self.limit:
            raise _OverLimit
        return func(*args, **kwargs)


def build_within_memory(build: Callable[[], Any], what: str) -> Any:
    """``build()``, stopped before an allocation on the CPU would take what it allocated past
    the memory available: then :class:`InsufficientMemoryError` says what ``what`` (a config,
    ``denoiser=unet``) needs in all, counted by building it on the meta device."""
    room = available_memory("cpu")
    if room is None or torch.empty(0).device.type != "cpu":  # under `with torch.device(...)`
        return build()
    limit = _AllocationLimit(room[0])
    try:
        with limit:
            return build()
    except _OverLimit:
        pass
    counted = meta_build_bytes(build)
    needed, numbers = (counted[1], f" ({counted[2]:,} numbers)") if counted else (limit.total, "")
    raise InsufficientMemoryError(
        f"{what} needs {'' if counted else 'more than '}{format_bytes(needed)} for its parameters "
        f"and buffers{numbers}, but {format_bytes(room[0])} {room[1]}",
        needed=needed,
        available=room[0],
    )


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of the tensors created under it that are still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views, in place
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    n = t.numel() * t.element_size()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out


class _Call(nn.Module):
    def __init__(self, module: nn.Module, run: Callable[[], Any]) -> None:
        super().__init__()
        self.module, self.run = module, run

    def forward(self) -> Any:
        return self.run()


def meta_peak_bytes(module: nn.Module, run: Callable[[], Any]) -> int | None:
    """The most bytes that the tensors ``run()`` creates hold at once, with ``module``'s
    parameters and buffers swapped for meta tensors during the call (``run`` gives meta
    inputs too): the activations of a forward at any size, without computing or allocating
    them. None when the code cannot run on meta tensors (it reads a value, or mixes in a
    tensor of its own): no estimate, no refusal."""
    from torch.func import functional_call

    meta = {
        f"module.{name}": torch.empty_like(t, device="meta")
        for name, t in chain(
            module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
        )
    }
    counter = _LiveTensors()
    try:
        with counter:
            functional_call(_Call(module, run), meta, ())
    except Exception:  # noqa: BLE001 - not runnable on meta: nothing to say
        return None
    return counter.peak
