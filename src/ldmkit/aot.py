"""``compile=aot``: the sampling denoiser compiled ahead of time (AOTInductor), kept on disk.

``compile=auto`` compiles sampling in place with ``torch.compile``, whose tracing and freezing
are paid again in every process (about a minute on 2 cores), so it compiles only for long
runs. An AOTInductor package (``torch.export`` + ``aoti_compile_and_package``) is compiled
once per weights, input shapes, dtype, torch version and host, written to a cache folder, and
loaded by every later process in a fraction of a second (0.05 s for issue 30's UNet, which then
ran 1.26x the eager bf16 forward on an AMX host: benchmarks/aot_package.py).

:class:`PackagedDenoiser` wraps the module sampling calls (the bf16/fp16 weight copy, or the
float32 denoiser): each input signature (shapes and dtypes of ``z_t``, ``t`` and the
conditioning tensors) gets its package, compiled at its first call or loaded from the cache;
a denoiser ``torch.export`` cannot trace runs eagerly, with one warning naming why.

The cache: ``LDMKIT_AOT_CACHE`` (default ``~/.cache/ldmkit/aot``), one ``.pt2`` file per key,
written atomically; delete the folder to free it. CPU only for now (measured there).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.errors import LdmkitError

__all__ = ["AOTError", "PackagedDenoiser", "aot_cache_dir"]


class AOTError(LdmkitError, ValueError):
    """``compile=aot`` where it cannot run (another device than the CPU, a training run)."""


def aot_cache_dir() -> Path:
    """``LDMKIT_AOT_CACHE`` or ``~/.cache/ldmkit/aot``."""
    configured = os.environ.get("LDMKIT_AOT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ldmkit" / "aot"


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class _Flat(nn.Module):
    """The denoiser with positional tensors (what ``torch.export`` takes): floating inputs cast
    to the weights' dtype (autocast's job in eager sampling), the output float32."""

    def __init__(self, net: nn.Module, keys: tuple[str, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.keys, self.dtype = net, keys, dtype

    def forward(self, z_t: Tensor, t: Tensor, *cond: Tensor) -> Tensor:
        def cast(x: Tensor) -> Tensor:
            return x.to(self.dtype) if x.is_floating_point() else x

        return self.net(cast(z_t), t, {k: cast(v) for k, v in zip(self.keys, cond, strict=True)}).float()


class PackagedDenoiser(nn.Module):
    """``net`` (the module sampling calls) as AOTInductor packages, one per input signature,
    in ``cache`` (default :func:`aot_cache_dir`)."""

    def __init__(self, net: nn.Module, cache: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net = net
        self.cache = Path(cache) if cache is not None else aot_cache_dir()
        floating = [p for p in net.parameters() if p.is_floating_point()]
        self.dtype = floating[0].dtype if floating else torch.float32
        self._digest: str | None = None
        self._runners: dict[tuple, Any] = {}
        self.compiled = self.loaded = 0  # packages compiled / loaded from the cache by this instance

    def __getstate__(self) -> dict:
        # a loaded package is a C++ runner, neither copied nor pickled: a copy loads it again
        # from the cache at its first call
        state = super().__getstate__()
        state["_runners"] = {}
        return state

    def key(self, signature: tuple) -> str:
        """The cache key of a package: torch and ldmkit versions, the host, the denoiser's class
        and weights, the input signature."""
        from ldmkit._version import __version__
        from ldmkit.precision import cpu_flags

        if self._digest is None:
            self._digest = _weights_digest(self.net)
        parts = (torch.__version__, __version__, platform.machine(), sorted(cpu_flags()),
                 type(self.net).__module__, type(self.net).__qualname__, self._digest, signature)  # fmt: skip
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def forward(self, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        keys = tuple(sorted(cond))
        args = (z_t, t, *(cond[k] for k in keys))
        signature = (keys, *((tuple(a.shape), str(a.dtype)) for a in args))
        runner = self._runners.get(signature)
        if runner is None:
            runner = self._runners[signature] = self._package(signature, keys, args)
        if runner is False:  # torch.export could not trace it: eager
            return self.net(z_t, t, cond)
        return runner(*args)

    def _package(self, signature: tuple, keys: tuple[str, ...], args: tuple[Tensor, ...]) -> Any:
        # torch's C++-extension module says at import that a CPU host has no CUDA runtime: not news
        quiet = logging.getLogger("torch.utils.cpp_extension")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        if any(a.device.type != "cpu" for a in args):
            raise AOTError("compile=aot runs on the CPU only (measured there); use compile=auto on CUDA")
        path = self.cache / f"denoiser-{self.key(signature)}.pt2"
        if not path.is_file():
            shapes = ", ".join("x".join(map(str, shape)) for shape, _ in signature[1:])
            print(f"compile=aot: compiling {type(self.net).__name__} ahead of time for inputs {shapes} (once: later "
                  f"runs load {path})", file=sys.stderr, flush=True)  # fmt: skip
            try:
                self._compile(path, keys, args)
            except Exception as err:  # export/compile of a denoiser it cannot trace: stay eager
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(
                    f"compile=aot: {type(self.net).__name__} could not be compiled ahead of time "
                    f"({type(err).__name__}: {first}); it samples eagerly",
                    stacklevel=4,
                )
                return False
            self.compiled += 1
        else:
            self.loaded += 1
        return torch._inductor.aoti_load_package(str(path))

    def _compile(self, path: Path, keys: tuple[str, ...], args: tuple[Tensor, ...]) -> None:
        import torch._inductor.config as inductor_config

        flat = _Flat(self.net, keys, self.dtype).eval()
        # traced outside the caller's autocast and inference mode: the package is the same
        # whatever context compiled it (the casts autocast would make are _Flat's)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            example = tuple(a.clone() for a in args)  # not inference tensors
            exported = torch.export.export(flat, example)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")  # aoti writes .pt2 names only
        freezing = inductor_config.freezing
        inductor_config.freezing = True  # the weights folded in: the CPU inference recipe
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, path)  # whole or absent: a reader never loads half a package
        finally:
            inductor_config.freezing = freezing
            partial.unlink(missing_ok=True)
