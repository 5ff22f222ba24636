"""Scaled dot-product attention, ``softmax(Q K^T / sqrt(d)) V``, with run-time kernels.

The LDM paper (Rombach et al. 2022, Sec. 3.3) conditions the UNet through
cross-attention; every attention in ldmkit goes through :func:`attention` so the
kernel can be chosen once, at run time, without touching model code:

* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` (PyTorch picks
  flash / memory-efficient / math per device and dtype). The default.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors only).
* ``math``: the formula written out with two matmuls and a float32 softmax; the
  reference the others are tested against.
* ``chunked``: SDPA over slices of ``chunk_size`` queries at a time, so the score
  matrix never exceeds ``B x heads x chunk_size x M`` even where SDPA would fall back
  to materialising all ``N x M`` scores (large latents on MPS / old GPUs / CPU half).
  It caps inference memory; training still keeps what backward needs.
* ``auto``: ``xformers`` when the tensors are on CUDA and its CUDA kernels run here (probed
  once: a wheel built for another torch/CUDA imports but has none), else ``sdpa``.

Layout: ``q`` is ``B x heads x N x d``, ``k`` and ``v`` are ``B x heads x M x d``
(``v`` may have its own last dim); the result is ``B x heads x N x d_v``. This is
SDPA's layout; other kernels get views.

The process-wide default (``auto``) is set from the config key ``attention.backend``
with :func:`set_attention_backend`; :func:`attention_backend` overrides it in a block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "attention",
    "attention_backend",
    "get_attention_backend",
    "naive_attention",
    "resolve_attention_backend",
    "set_attention_backend",
    "xformers_available",
    "xformers_cuda_problem",
    "xformers_usable_on_cuda",
]

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "math", "chunked")
# 1024 queries x 4096 keys x 4 bytes = 16 MiB of scores per (batch, head) slice
DEFAULT_CHUNK_SIZE = 1024

_default_backend = "auto"
_default_chunk_size = DEFAULT_CHUNK_SIZE


@functools.cache
def xformers_available() -> bool:
    """Whether ``xformers.ops`` can be imported (checked once per process)."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a broken install (wrong torch/CUDA build) counts as absent
        return False
    return True


@functools.cache
def xformers_cuda_problem() -> str | None:
    """None when xformers' kernels run on this process's CUDA device, else why not (checked
    once with a tiny call: a PyPI wheel built for another torch or CUDA imports fine but has
    no CUDA kernels)."""
    if not xformers_available():
        return "xformers is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    import xformers
    import xformers.ops

    q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.float16)
    try:
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as err:  # NotImplementedError: "xFormers wasn't build with CUDA support"
        reason = str(err).strip().splitlines()
        detail = next((line.strip() for line in reason if "CUDA" in line or "built" in line),
                      reason[0].strip() if reason else type(err).__name__)
        return f"xformers {getattr(xformers, '__version__', '?')} has no usable CUDA kernel here ({detail})"
    return None


def xformers_usable_on_cuda() -> bool:
    """Whether ``auto`` may pick xformers for CUDA tensors."""
    return xformers_available() and torch.cuda.is_available() and xformers_cuda_problem() is None


def _check_name(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; expected one of {', '.join(ATTENTION_BACKENDS)}"
        )
    if name == "xformers" and not xformers_available():
        raise ValueError(
            "attention backend 'xformers' was requested but xformers is not installed "
            "(pip install xformers, or set attention.backend=auto|sdpa|math|chunked)"
        )
    return name


def set_attention_backend(name: str, *, chunk_size: int | None = None) -> None:
    """Set the process-wide attention backend (config key ``attention.backend``).

    :param name: one of ``auto``, ``sdpa``, ``xformers``, ``math``, ``chunked``.
    :param chunk_size: queries per slice for ``chunked`` (default 1024).
    :raises ValueError: an unknown name, or ``xformers`` without xformers installed.
    """
    global _default_backend, _default_chunk_size
    _default_backend = _check_name(name)
    if chunk_size is not None:
        _default_chunk_size = _check_chunk_size(chunk_size)


def get_attention_backend() -> str:
    """The process-wide attention backend name (``auto`` unless set)."""
    return _default_backend


@contextlib.contextmanager
def attention_backend(name: str, *, chunk_size: int | None = None) -> Iterator[None]:
    """Use another process-wide backend inside a ``with`` block."""
    previous = (_default_backend, _default_chunk_size)
    set_attention_backend(name, chunk_size=chunk_size)
    try:
        yield
    finally:
        _set_raw(*previous)


def _set_raw(name: str, chunk_size: int) -> None:
    global _default_backend, _default_chunk_size
    _default_backend, _default_chunk_size = name, chunk_size


def _check_chunk_size(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"attention chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def resolve_attention_backend(name: str | None, q: Tensor) -> str:
    """The concrete kernel ``name`` (None: the process default) means for ``q``."""
    name = _check_name(_default_backend if name is None else name)
    if name == "auto":
        return "xformers" if q.is_cuda and xformers_usable_on_cuda() else "sdpa"
    if name == "xformers" and not q.is_cuda:
        raise ValueError(
            f"attention backend 'xformers' needs CUDA tensors, got device {q.device}; "
            "use attention.backend=auto to fall back to SDPA off CUDA"
        )
    if name == "xformers" and (problem := xformers_cuda_problem()) is not None:
        raise ValueError(
            f"attention backend 'xformers': {problem}; install an xformers build matching torch "
            f"{torch.__version__} (python -m xformers.info lists its kernels) or use attention.backend=sdpa"
        )
    return name


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    backend: str | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """``softmax(q k^T * scale) v`` over the last two dims; ``scale`` defaults to 1/sqrt(d).

    :param q: ``B x heads x N x d`` queries.
    :param k: ``B x heads x M x d`` keys.
    :param v: ``B x heads x M x d_v`` values.
    :param backend: a name from ``ATTENTION_BACKENDS``; None uses the process default.
    :param chunk_size: queries per slice for ``chunked`` (None: the process default).
    :returns: ``B x heads x N x d_v``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects 4-d tensors B x heads x tokens x dim, got shapes "
            f"q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}"
        )
    kernel = resolve_attention_backend(backend, q)
    if kernel == "sdpa":
        if _float32_on_cpu_for_backward(q, k, v):
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if kernel == "math":
        return naive_attention(q, k, v, scale=scale)
    if kernel == "chunked":
        size = _default_chunk_size if chunk_size is None else _check_chunk_size(chunk_size)
        return _chunked_attention(q, k, v, size, scale)
    return _xformers_attention(q, k, v, scale)


# Below this many query x key pairs, PyTorch's CPU flash-attention *backward* in bf16/fp16 is
# slower than in float32 (torch 2.14, AVX512-BF16, 1 thread: 64 tokens 9.4 vs 3.6 ms forward +
# backward, 256 tokens 40.7 vs 32.9 ms; at 1,024 tokens bf16 wins, 161 vs 202 ms). Training an
# LDM at CPU scale lives below it: the demo UNet's train step in bf16 was 1.20x faster than in
# float32 with bf16 attention and 1.40x with float32 attention (interleaved, 1 thread) (benchmarks/unet_train_step.py).
CPU_FLOAT32_BACKWARD_PAIRS = 256 * 256


def _float32_on_cpu_for_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a CPU SDPA call in bf16/fp16 that autograd will differentiate runs faster in
    float32 (see ``CPU_FLOAT32_BACKWARD_PAIRS``). Inference keeps the low precision: there
    the forward alone is faster in bf16."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and q.shape[-2] * k.shape[-2] <= CPU_FLOAT32_BACKWARD_PAIRS
    )


def naive_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """The textbook formula: two matmuls and a softmax (in float32 for half inputs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _chunked_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, scale) -> Tensor:
    if q.shape[-2] <= chunk_size:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    slices = [
        F.scaled_dot_product_attention(q_slice, k, v, scale=scale)
        for q_slice in q.split(chunk_size, dim=-2)
    ]
    return torch.cat(slices, dim=-2)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale) -> Tensor:
    import xformers.ops

    # xformers wants B x tokens x heads x d; these are views of SDPA's layout
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)
