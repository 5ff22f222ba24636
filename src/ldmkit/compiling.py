"""``compile=true``: ``torch.compile`` where it pays (``trainer.compile`` for training, the
top-level ``compile`` for ``ldmkit sample``, ``Pipeline.sample(compile=...)``).

What is compiled: the module that takes nearly all of the time — the denoiser (the UNet) in
stage 2 and in sampling, the first stage in stage 1. It is compiled *in place*
(``nn.Module.compile``), so parameter names, ``state_dict()`` and checkpoints are exactly
those of the uncompiled module: a run can be resumed with compilation switched on or off.

Where it pays: on CUDA, inductor fuses GroupNorm + SiLU, the attention's projections and the
elementwise tails of the ResNet blocks into fewer kernels (docs/performance.md has the
measured figures). On the CPU it is allowed, but measured here without gain (0.97x for a
training step after a 4-minute compile, 1.0x for a sampling forward: the time is in oneDNN
convolutions and matrix products that inductor calls as they are), so ldmkit prints a
one-line note when it is asked for on a CPU.

Values: ``false`` (default), ``true`` (inductor's default mode), or an inductor mode name
(``reduce-overhead``: CUDA graphs; ``max-autotune``; ``max-autotune-no-cudagraphs``).
``compile_backend`` (default ``inductor``) picks another ``torch.compile`` backend, e.g.
``eager`` or ``aot_eager`` to check a model traces without compiling kernels.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ldmkit.config_checks import Boolean, Choice, Either
from ldmkit.errors import LdmkitError

__all__ = ["COMPILE_MODES", "COMPILE_OPTION", "check_compile", "compile_module", "is_compiled"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# what a `compile` / `trainer.compile` key takes, for the config checker
COMPILE_OPTION = Either(Boolean(), Choice(*COMPILE_MODES))


class CompileSettingError(LdmkitError, ValueError):
    """A ``compile`` value that is not false, true or an inductor mode."""


def check_compile(value: Any, *, key: str = "compile") -> str | None:
    """The inductor mode for a ``compile`` setting (``"default"`` for true), or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("false", "off", "no", "0"):
            return None
        if lowered in ("true", "on", "yes", "1"):
            return "default"
        if lowered in COMPILE_MODES:
            return lowered
    raise CompileSettingError(
        f"{key}={value!r}: expected true, false or one of {', '.join(COMPILE_MODES)}"
    )


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_module` (``nn.Module.compile``) was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_module(
    module: nn.Module,
    setting: Any,
    *,
    device: torch.device | str = "cpu",
    backend: str = "inductor",
    key: str = "compile",
    what: str = "the model",
) -> bool:
    """Compile ``module`` in place for ``setting`` (see :func:`check_compile`); returns
    whether it is compiled. Already compiled modules are left alone."""
    mode = check_compile(setting, key=key)
    if mode is None:
        return False
    if is_compiled(module):
        return True
    if not hasattr(torch, "compile"):
        raise CompileSettingError(f"{key}={setting!r}: this torch has no torch.compile")
    if torch.device(device).type == "cpu" and backend == "inductor":
        warnings.warn(
            f"{key}: compiling {what} for the CPU; measured without gain on CPUs "
            "(docs/performance.md), it only pays on CUDA",
            stacklevel=2,
        )
    options = {"backend": backend}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    module.compile(**options)
    return True
