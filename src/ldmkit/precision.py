"""Numeric precision of training and sampling: ``auto | fp32 | bf16 | fp16``.

``bf16`` and ``fp16`` run the networks under :func:`torch.autocast` (weights stay float32;
matrix products and convolutions run in the low precision, reductions such as GroupNorm's
statistics and softmax stay float32 by autocast's own rules and ldmkit's
:class:`~ldmkit.nn.GroupNorm32`). ``auto`` picks ``bf16`` where it is fast — on CUDA, and on
CPUs with AVX512-BF16 or AMX (detected at run time) — and ``fp32`` elsewhere.

Sampling in bf16/fp16 runs the denoiser on a low-precision *copy* of its weights
(:func:`low_precision_copy`, made once and reused while the weights do not change) instead
of autocast casting every weight again at every step; the float32 weights are never touched.

What stays float32 whatever the choice, and why:

* **the loss** (the diffusion MSE, the autoencoder's L1/LPIPS/KL/adversarial terms): the
  network's output is cast to float32 before it; a sum of squares over millions of values in
  bf16 (8 bits of mantissa) loses the small per-element differences the gradient is made of;
* **the sampler's arithmetic**: the latent ``z_t`` and every update
  ``z_{t-1} = a z_t + b eps`` are float32 (only the denoiser's forward is autocast), so 1,000
  small DDPM steps do not accumulate bf16 round-off;
* **the first stage's decode at sampling time** and **the encode of training latents**: one
  call each, a small share of the time, and their outputs are final pixels (bf16 would band
  8-bit images: its relative step near 1.0 is 1/128) or the latents every later step learns
  from (and the scale factor estimated from them);
* **optimizer state and the EMA**: the weights themselves are never cast.

``fp16`` training scales the loss (:class:`torch.amp.GradScaler`) against underflow; bf16
has float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterable, Iterator

import torch

from ldmkit.errors import LdmkitError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of x86 CPUs with native bf16 matrix instructions
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# the kinds of CPU bf16 support :func:`cpu_bf16_units` tells apart
CPU_BF16_UNITS = {
    "amx": "AMX tiles (amx_bf16): bf16 matrix products on the matrix units, several times float32",
    "avx512_bf16": "AVX512-BF16 without AMX: bf16 dot products on the vector units",
    None: "no AVX512-BF16 or AMX: bf16 is emulated, slower than float32",
}


class PrecisionError(LdmkitError, ValueError):
    """An unknown precision name (the message lists the valid ones)."""


def check(precision: str, *, key: str = "precision") -> str:
    """``precision`` as one of :data:`PRECISIONS`; a clear error naming ``key`` otherwise."""
    name = str(precision).lower()
    aliases = {
        "float32": "fp32",
        "32": "fp32",
        "bfloat16": "bf16",
        "float16": "fp16",
        "16": "fp16",
        "half": "fp16",
    }
    name = aliases.get(name, name)
    if name not in PRECISIONS:
        raise PrecisionError(
            f"{key}={precision!r} is not a precision: use one of {', '.join(PRECISIONS)}"
        )
    return name


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _torch_cpu_probe(name: str) -> bool:
    """torch's own detection of a CPU feature (``torch.cpu._is_amx_tile_supported`` ...),
    for where ``/proc/cpuinfo`` is absent; False where torch has no such probe."""
    fn = getattr(getattr(torch, "cpu", None), name, None)
    with contextlib.suppress(Exception):
        return bool(fn is not None and fn())
    return False


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    if BF16_CPU_FLAGS & cpu_flags():
        return True
    return any(_torch_cpu_probe(p) for p in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_bf16_units(flags: Iterable[str] | None = None) -> str | None:
    """``"amx"`` (AMX-BF16 tiles), ``"avx512_bf16"`` (bf16 dot products on the vector units,
    no AMX) or None (neither: bf16 would be emulated) for this CPU, or one with ``flags``."""
    read = cpu_flags() if flags is None else frozenset(flags)
    if "amx_bf16" in read:
        return "amx"
    if "avx512_bf16" in read:
        return "avx512_bf16"
    if flags is None and not read:  # this CPU, no /proc/cpuinfo: torch's own probes
        if _torch_cpu_probe("_is_amx_tile_supported"):
            return "amx"
        if _torch_cpu_probe("_is_avx512_bf16_supported"):
            return "avx512_bf16"
    return None


def cpu_has_fast_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) runs bf16 matrix products natively."""
    if flags is not None:
        return bool(BF16_CPU_FLAGS & set(flags))
    return _cpu_has_fast_bf16()


def resolve(
    precision: str, device: torch.device | str, *, flags: Iterable[str] | None = None
) -> str:
    """``auto`` -> ``bf16`` on CUDA (where the GPU supports it) and on CPUs with AVX512-BF16 or
    AMX, else ``fp32``; an explicit choice is returned as it is (checked)."""
    name = check(precision)
    device = torch.device(device)
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16(flags) else "fp32"
    return "fp32"


def reason(
    precision: str,
    resolved: str,
    device: torch.device | str,
    *,
    flags: Iterable[str] | None = None,
) -> str:
    """One line saying what was chosen and why (printed once by the trainers and the CLI).
    On a CPU it names the kind of bf16 support (:data:`CPU_BF16_UNITS`): AMX, AVX512-BF16
    without AMX, or neither."""
    device = torch.device(device)
    if check(precision) != "auto":
        return f"precision: {resolved} (as configured) on {device.type}"
    if device.type == "cuda":
        why = "CUDA" if resolved == "bf16" else "this GPU has no bf16"
    elif device.type == "cpu":
        why = f"this CPU has {CPU_BF16_UNITS[cpu_bf16_units(flags)]}"
    else:
        why = f"no bf16 rule for {device.type}"
    return f"precision: {resolved} (auto: {why})"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of a *resolved* precision (a no-op for ``fp32``)."""
    device = torch.device(device)
    name = check(precision)
    if name == "auto":
        raise PrecisionError("autocast() takes a resolved precision: call resolve() first")
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[name])


@contextlib.contextmanager
def float32() -> Iterator[None]:
    """Run a block in float32 inside an autocast region (e.g. a decode)."""
    with (
        torch.autocast(device_type="cuda", enabled=False),
        torch.autocast(device_type="cpu", enabled=False),
    ):
        yield


def low_precision_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` whose floating-point parameters and buffers are ``dtype``, for
    inference: made in one pass without a float32 intermediate copy (the copy's tensors are
    cast straight from the originals), parameters without ``requires_grad``. ``module`` and
    its float32 weights are left as they are. A module compiled in place
    (``nn.Module.compile``) is copied uncompiled: the compiled call would run the original."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        compiled = sub.__dict__.get("_compiled_call_impl")
        if compiled is not None:
            memo[id(compiled)] = None
    for p in module.parameters():
        if p.is_floating_point():
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in module.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.detach().to(dtype)
    low = copy.deepcopy(module, memo)
    low.requires_grad_(False)
    return low


class PackedConv2d(torch.nn.Conv2d):
    """A bf16 :class:`~torch.nn.Conv2d` for CPU inference whose weight is kept in oneDNN's
    blocked layout (:func:`pack_cpu_convolutions`), so each call skips the weight reorder
    that ``F.conv2d`` makes again at every call. It is the same oneDNN convolution on the same
    values; with the weight's layout fixed oneDNN may block a few shapes differently (seen on
    1-4 pixel maps), so an output can differ from ``F.conv2d``'s in its last bf16 bit, no more.
    A call that needs autograd, runs on another device, finds the weight cast to another
    dtype, or is being traced by ``torch.compile`` (inductor packs weights its own way) takes
    the plain ``Conv2d`` path; a weight written in place (``load_state_dict``) is packed again
    at the next call."""

    _packed_weight: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def __getstate__(self) -> dict:
        # oneDNN's opaque tensor has no storage to copy or pickle: a copy (deepcopy, torch.save
        # of a pipeline that sampled) packs its weight again at its first call
        state = super().__getstate__()
        state.pop("_packed_weight", None)
        state.pop("_packed_key", None)
        return state

    def _pack(self) -> None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, None
        )
        # set together, once both exist: a pack that raises leaves the module as it was
        self._packed_weight, self._packed_key = packed, tensor_signature(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
            or not _packable(self, exact_type=False)  # moved, cast (.float()) since it was packed
        ):
            return super().forward(x)
        if self._packed_key != tensor_signature(self.weight):  # the weight was written (load_state_dict, copy_)
            self._pack()
        # autocast would cast the input to the weights' bf16; the packed op has no autocast rule
        out = torch.ops.mkldnn._convolution_pointwise(
            x.to(self.weight.dtype), self._packed_weight, self.bias,
            self.padding, self.stride, self.dilation, self.groups, "none", [], "",
        )  # fmt: skip
        # oneDNN may hand back its preferred channels-last layout: the memory format F.conv2d
        # gives (that of the input) keeps every later op on the kernels it had
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def tensor_signature(t: torch.Tensor) -> tuple:
    """What changes when a weight changes: its identity, storage, version counter (bumped by
    every in-place write: optimizer steps, ``load_state_dict``, ``copy_``), dtype and device.
    The sampling weight copy is made again (``Pipeline.sampling_denoiser``) and a packed
    convolution packs again when it changes."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        version = None
    return (id(t), t.data_ptr(), version, t.dtype, t.device)


def _packable(conv: torch.nn.Module, exact_type: bool = True) -> bool:
    return (
        (type(conv) is torch.nn.Conv2d or not exact_type)  # a subclass may have its own forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == torch.bfloat16
        and conv.weight.device.type == "cpu"
        and (conv.bias is None or conv.bias.dtype == torch.bfloat16)
    )


def pack_cpu_convolutions(module: torch.nn.Module) -> int:
    """Turn ``module``'s bf16 CPU :class:`~torch.nn.Conv2d` layers into :class:`PackedConv2d`
    in place: each weight is reordered once into oneDNN's blocked layout (what
    ``torch.compile``'s freezing does), for a module that serves inference only (the sampling
    weight copy of :func:`low_precision_copy`). The outputs stay those of ``F.conv2d`` to the
    last bf16 bit; the weights stay the module's parameters (``state_dict`` is unchanged).
    Returns how many layers were
    packed: none where PyTorch has no oneDNN bf16 convolution."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return 0
    packed = 0
    for conv in module.modules():
        if not _packable(conv):
            continue
        conv.__class__ = PackedConv2d
        try:
            conv._pack()
        except RuntimeError:  # no oneDNN bf16 convolution on this build / CPU: keep F.conv2d
            conv.__class__ = torch.nn.Conv2d
            return packed
        packed += 1
    return packed


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for ``fp16`` only (bf16 and fp32 need none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=check(precision) == "fp16")


__all__ = [
    "BF16_CPU_FLAGS",
    "CPU_BF16_UNITS",
    "DTYPES",
    "PRECISIONS",
    "PackedConv2d",
    "PrecisionError",
    "autocast",
    "check",
    "cpu_bf16_units",
    "cpu_flags",
    "cpu_has_fast_bf16",
    "float32",
    "grad_scaler",
    "low_precision_copy",
    "pack_cpu_convolutions",
    "reason",
    "resolve",
    "tensor_signature",
]
