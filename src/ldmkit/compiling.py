"""``compile=true``: ``torch.compile`` where it pays (``trainer.compile`` for training, the
top-level ``compile`` for ``ldmkit sample``, ``Pipeline.sample(compile=...)``).

What is compiled: the module that takes nearly all of the time — the denoiser (the UNet) in
stage 2 and in sampling, the first stage in stage 1. It is compiled *in place*
(``nn.Module.compile``), so parameter names, ``state_dict()`` and checkpoints are exactly
those of the uncompiled module: a run can be resumed with compilation switched on or off.

Where it pays: on CUDA, inductor fuses GroupNorm + SiLU, the attention's projections and the
elementwise tails of the ResNet blocks into fewer kernels (docs/performance.md has the
measured figures). On a CPU without AVX512-BF16/AMX it was measured without gain (0.97x for
a training step after a 4-minute compile, 1.0x for a sampling forward: the time is in oneDNN
convolutions and matrix products that inductor calls as they are), so ldmkit warns once when
it is asked for there; on an AVX512-BF16 CPU a bf16 sampling forward gained 1.18x after a 68 s
compile (:data:`AUTO_RULES` holds the measured rule of each kind of host).

Values: ``false`` (default), ``true`` (inductor's default mode), an inductor mode name
(``reduce-overhead``: CUDA graphs; ``max-autotune``: on CPUs also inductor's C++ GEMM
templates, which use AMX tiles where the CPU has them; ``max-autotune-no-cudagraphs``), or
``auto``: compile where it was measured to pay back its compile time for this much work, on
this kind of host (:data:`AUTO_RULES`, :func:`auto_compile`; the choice and its reason are
printed in one line), or, for sampling on a CPU, ``aot``: the denoiser compiled ahead of time
into a package kept on disk and loaded by later processes (:mod:`ldmkit.aot`).
``compile_backend`` (default ``inductor``) picks another ``torch.compile`` backend, e.g.
``eager`` or ``aot_eager`` to check a model traces without compiling kernels.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ldmkit.config_checks import Boolean, Choice, Either
from ldmkit.errors import LdmkitError
from ldmkit.precision import cpu_bf16_units

__all__ = [
    "AUTO_RULES",
    "COMPILE_MODES",
    "COMPILE_OPTION",
    "AutoCompileRule",
    "auto_compile",
    "check_compile",
    "compile_module",
    "host_kind",
    "is_compiled",
    "quiet_cpp_extension_log",
]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def quiet_cpp_extension_log() -> None:
    """Keep torch's C++-extension module from logging, when inductor first imports it, that a
    CPU host has no CUDA runtime (not news there); a level the user set is left alone."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.ERROR)

# what a `compile` / `trainer.compile` key takes, for the config checker
COMPILE_OPTION = Either(Boolean(), Choice(*COMPILE_MODES, "auto", "aot"))


@dataclass(frozen=True)
class AutoCompileRule:
    """What ``compile=auto`` does for one kind of host and one purpose.

    ``mode``: the inductor mode to compile with, ``"aot"``: an ahead-of-time package
    (:mod:`ldmkit.aot`, sampling on a CPU), None: never. ``min_work``: the least work
    (optimizer steps for ``train``, denoiser calls for ``sample``) for which the measured
    speed-up pays back the measured compile time, with a 2x margin; less work stays eager.
    ``measured``: the measurement behind the rule (or what is missing)."""

    mode: str | None
    min_work: int
    measured: str


# (host kind, purpose) -> rule. Host kinds: :func:`host_kind`. A kind whose gain was not
# measured stays eager (compile=max-autotune or true still compiles on request); the
# figures are in benchmarks/RESULTS.md ("Matrix units (issue 30)"), made with
# benchmarks/compile_gain.py on the host kind named.
AUTO_RULES: dict[tuple[str, str], AutoCompileRule] = {
    ("cpu", "train"): AutoCompileRule(
        None, 0, "CPUs without AVX512-BF16/AMX: 0.97x for a float32 train step after a 4-minute compile"
    ),
    ("cpu", "sample"): AutoCompileRule(None, 0, "CPUs without AVX512-BF16/AMX: 1.0x for a float32 sampling forward"),
    ("cpu-avx512_bf16", "train"): AutoCompileRule(
        None, 0, "AVX512-BF16 without AMX: a bf16 train step 1.01x after a 186 s compile, max-autotune 0.97x"
    ),
    ("cpu-avx512_bf16", "sample"): AutoCompileRule(
        "default",
        5448,
        "AVX512-BF16 without AMX: a bf16 sampling forward 1.18x after a 68 s compile (max-autotune 1.18x "
        "after 153 s); it pays back after 2,724 denoiser calls",
    ),
    ("cpu-amx", "train"): AutoCompileRule(
        None, 0, "AMX: a bf16 train step 0.985x after a 163 s compile, max-autotune 0.98x after 140 s"
    ),
    ("cpu-amx", "sample"): AutoCompileRule(
        "aot",
        1900,
        "AMX: an aot package of the bf16 sampling forward ran 1.77x the packed eager one after a 49 s "
        "compile, kept on disk for later runs (torch.compile 1.60x, paid again in every process); "
        "it pays back after 950 denoiser calls",
    ),
    ("cuda", "train"): AutoCompileRule(
        None, 0, "CUDA: not measured yet (the compile section of benchmarks/gpu_suite.py fills this rule)"
    ),
    ("cuda", "sample"): AutoCompileRule(
        None, 0, "CUDA: not measured yet (the graphs section of benchmarks/gpu_suite.py fills this rule)"
    ),
}


def host_kind(device: torch.device | str, flags: Iterable[str] | None = None) -> str:
    """``cuda``, ``cpu-amx``, ``cpu-avx512_bf16`` or ``cpu`` (neither), from the CPU flags
    (``/proc/cpuinfo``, or ``flags``); another device type is returned as it is."""
    kind = torch.device(device).type
    if kind != "cpu":
        return kind
    units = cpu_bf16_units(flags)
    return "cpu" if units is None else f"cpu-{units}"


def auto_compile(
    device: torch.device | str,
    purpose: str,
    *,
    work: int | None = None,
    flags: Iterable[str] | None = None,
) -> tuple[str | None, str]:
    """``(mode or None, reason)`` for ``compile=auto``: the rule of :data:`AUTO_RULES` for
    this host and ``purpose`` (``train`` or ``sample``), off when ``work`` (optimizer steps /
    denoiser calls; None: unknown, counted as enough) is below the rule's ``min_work``."""
    if purpose not in ("train", "sample"):
        raise ValueError(f"auto_compile: purpose must be 'train' or 'sample', got {purpose!r}")
    kind = host_kind(device, flags)
    rule = AUTO_RULES.get((kind, purpose))
    if rule is None:
        return None, f"no rule for {kind} ({purpose})"
    if rule.mode is None:
        return None, rule.measured
    unit = "steps" if purpose == "train" else "denoiser calls"
    if work is not None and work < rule.min_work:
        return None, f"{work} {unit} < {rule.min_work}, too few to pay back the compile ({rule.measured})"
    return rule.mode, rule.measured


class CompileSettingError(LdmkitError, ValueError):
    """A ``compile`` value that is not false, true or an inductor mode."""


def check_compile(value: Any, *, key: str = "compile") -> str | None:
    """The inductor mode for a ``compile`` setting (``"default"`` for true), ``"auto"``, or
    None (off)."""
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
        if lowered in COMPILE_MODES or lowered in ("auto", "aot"):
            return lowered
    raise CompileSettingError(
        f"{key}={value!r}: expected true, false, auto, aot or one of {', '.join(COMPILE_MODES)}"
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
    purpose: str = "train",
    work: int | None = None,
    quiet: bool = False,
) -> bool:
    """Compile ``module`` in place for ``setting`` (see :func:`check_compile`); returns
    whether it is compiled. Already compiled modules are left alone. ``auto`` decides by
    :func:`auto_compile` for ``purpose`` and ``work`` and prints the choice in one line
    (unless ``quiet``)."""
    mode = check_compile(setting, key=key)
    if mode is None:
        return False
    if mode == "aot":  # ahead of time, kept on disk: the pipeline's sampling (ldmkit.aot), not in place
        if purpose != "sample":
            raise CompileSettingError(
                f"{key}=aot compiles the sampling denoiser ahead of time (ldmkit.aot); for {purpose} use "
                "true, auto or an inductor mode"
            )
        return False
    if is_compiled(module):
        return True
    chosen_by_rule = mode == "auto"
    if chosen_by_rule:
        mode, why = auto_compile(device, purpose, work=work)
        if not quiet:
            print(f"{key}: {mode or 'off'} (auto: {why})", file=sys.stderr)
        if mode in (None, "aot"):  # aot: the pipeline packages the sampling denoiser (ldmkit.aot)
            return False
    if not hasattr(torch, "compile"):
        raise CompileSettingError(f"{key}={setting!r}: this torch has no torch.compile")
    if backend == "inductor" and not chosen_by_rule and host_kind(device) == "cpu":
        warnings.warn(
            f"{key}: compiling {what} for a CPU without AVX512-BF16/AMX; measured without gain "
            "on such CPUs (docs/performance.md)",
            stacklevel=2,
        )
    options = {"backend": backend}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    module.compile(**options)
    return True
