"""How many CPU threads a training uses (``trainer.num_threads``).

torch's default is one OpenMP thread per core. That is the fastest choice on an idle machine
and a very slow one on a shared one: every parallel region waits for its slowest thread, and a
thread that shares its core with another process waits for the scheduler. Measured on a
2-core machine (fmnist_ldm_kl_f4, batch 64, docs/training.md): 0.54 s/step with 2 threads and
0.76 s/step with 1 thread while the machine was otherwise nearly idle, but 12 s/step with
2 threads (4.9 s/step with ``OMP_WAIT_POLICY=PASSIVE``) against 0.86 s/step with 1 thread
while one other single-threaded job ran. So by default a training on the CPU takes half the
usable cores: two such jobs side by side never oversubscribe the machine, and alone it loses
at most the difference between half and all of the cores.

The choice depends only on the machine (never on its load at the moment), so a resumed run
uses the same count as the run it continues: the thread count changes the order of
floating-point reductions, and with it the bits of the weights.
"""

from __future__ import annotations

import os

import torch

__all__ = ["apply_num_threads", "default_num_threads", "resolve_num_threads", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and cgroup cpusets
    narrow), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_num_threads(cores: int | None = None) -> int:
    """Half the usable cores, at least one."""
    return max(1, (usable_cores() if cores is None else cores) // 2)


def resolve_num_threads(requested: int | str | None, device: torch.device | str = "cpu") -> int | None:
    """The thread count for ``trainer.num_threads=requested``: a positive number as given;
    ``null``/``auto`` gives :func:`default_num_threads` on the CPU, and None (leave torch's
    setting alone) on an accelerator, whose speed does not depend on it, or where the user
    chose through ``OMP_NUM_THREADS``."""
    if requested is not None and str(requested).strip().lower() != "auto":
        try:
            count = int(requested)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or str(count) != str(requested).strip():
            raise ValueError(f"trainer.num_threads must be a positive integer, null or 'auto'; got {requested!r}")
        return count
    if torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return default_num_threads()


def apply_num_threads(requested: int | str | None, device: torch.device | str = "cpu") -> int:
    """Set torch's intra-op thread count for ``trainer.num_threads=requested`` (see
    :func:`resolve_num_threads`); returns the count in effect."""
    count = resolve_num_threads(requested, device)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    return torch.get_num_threads()
