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
written atomically. A package holds a bf16 (or float32) copy of the weights, so the folder is
kept under ``LDMKIT_AOT_CACHE_GB`` (default 20; 0: no limit): after each compile the packages
used least recently go first (:func:`prune_cache`). CPU only for now (measured there).

``compile=auto`` on a CPU uses the same cache without adding to it (``compile_missing=False``):
inputs whose package is already there (made by an earlier ``compile=aot`` run) run it, others
run the module as ``auto`` left it. An empty cache costs nothing: the key (a digest of the
weights) is computed only when the cache holds packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.compiling import quiet_cpp_extension_log
from ldmkit.errors import LdmkitError, first_line

__all__ = ["DEFAULT_CACHE_GB", "AOTError", "PackagedDenoiser", "aot_cache_dir", "cache_limit", "load_package", "prune_cache"]


class AOTError(LdmkitError, ValueError):
    """``compile=aot`` where it cannot run (another device than the CPU, a training run)."""


def aot_cache_dir() -> Path:
    """``LDMKIT_AOT_CACHE`` or ``~/.cache/ldmkit/aot``."""
    configured = os.environ.get("LDMKIT_AOT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ldmkit" / "aot"


#: ``LDMKIT_AOT_CACHE_GB`` when unset: room for about 400 packages of issue 30's UNet (50 MB)
#: or a handful of the paper's full-size models (1-3 GB each)
DEFAULT_CACHE_GB = 20.0


def cache_limit() -> int | None:
    """The cache's size limit in bytes (``LDMKIT_AOT_CACHE_GB``, default
    :data:`DEFAULT_CACHE_GB`); None for ``0``: no limit."""
    raw = os.environ.get("LDMKIT_AOT_CACHE_GB", "").strip()
    try:
        gigabytes = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0 or gigabytes == float("inf"):
        raise AOTError(f"LDMKIT_AOT_CACHE_GB={raw!r}: expected a number of gigabytes >= 0 (0: no limit)")
    return int(gigabytes * 2**30) if gigabytes > 0 else None


def prune_cache(cache: str | os.PathLike, limit: int, *, keep: Sequence[Path] = ()) -> list[Path]:
    """Delete packages from ``cache``, least recently used first (modification time: a load
    touches its package), until the ``.pt2`` files (unreadable ones set aside included) take at
    most ``limit`` bytes; ``keep`` (the package just written or loaded) is never deleted.
    Returns the deleted paths. Another process pruning or loading at the same time is harmless:
    a package already gone is skipped, and a loaded package's library is mapped from a copy."""
    found = []
    for path in [*Path(cache).glob("denoiser-*.pt2"), *Path(cache).glob("denoiser-*.pt2.unreadable")]:
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        found.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in found)
    kept = {Path(p) for p in keep}
    removed = []
    for _, size, path in sorted(found, key=lambda entry: entry[0]):
        if total <= limit:
            break
        if path in kept:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
        total -= size
    return removed


def _weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            digest.update(data.view(-1).view(torch.uint8).numpy())  # the buffer itself, not a bytes copy
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    line = first_line(err)
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def load_package(path: str | os.PathLike) -> Callable[..., Tensor]:
    """A compiled package's forward (positional tensors in, the output tensor out), its weights
    moved into 64-byte-aligned memory.

    AOTInductor's CPU loader copies every weight, oneDNN's packed ones included, into one
    ``std::malloc`` blob, which is 16-byte aligned only (a large one: page + 16), so the packed
    weights mostly start mid cache line and oneDNN's AMX kernels ran about 2x slower on them
    (benchmarks/RESULTS.md, "Matrix units"). Here the loaded constants are cloned (torch and
    oneDNN allocate 64-byte aligned), handed back as the runner's own (``user_managed``), and the
    malloc'd blob is freed. Where the runner API is missing (another torch), the plain loader."""
    path = Path(path)
    try:
        return _aligned_runner(path)
    except (AttributeError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as err:
        logging.getLogger(__name__).info("compile=aot: %s loaded as it is (%s)", path, err)
        return torch._inductor.aoti_load_package(str(path))


def _aligned_runner(path: Path) -> Callable[..., Tensor]:
    folder = Path(tempfile.mkdtemp(prefix="ldmkit-aot-"))
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if "/data/aotinductor/" in n]
            archive.extractall(folder, members)
        libraries = sorted(folder.rglob("*.so"))
        wrappers = [f for f in libraries if f.name.endswith(".wrapper.so")] or libraries
        if len(wrappers) != 1:
            raise ValueError(f"expected one model library in {path}, found {len(wrappers)}")
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(wrappers[0]), 1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped
    loaded = runner.extract_constants_map(False)
    aligned = {
        name: loaded[fqn if fqn in loaded else name].clone()
        for name, fqn in runner.get_constant_names_to_original_fqns().items()
    }
    # the clones become the inactive buffer, then the active one; the malloc'd blob is freed
    runner.update_constant_buffer(aligned, True, True, True)
    runner.swap_constant_buffer()
    runner.free_inactive_constant_buffer()
    del loaded

    def forward(*args: Tensor) -> Tensor:
        return runner.run([a.contiguous() for a in args])[0]

    forward.constants = aligned  # user-managed: the runner reads this memory, kept alive here
    return forward


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
    in ``cache`` (default :func:`aot_cache_dir`).

    ``compile_missing=False`` (``compile=auto``): packages already in the cache are loaded,
    missing ones are not compiled (those inputs run ``net``). ``note``: a line printed to
    stderr at the first call that finds no package (``auto``'s own choice and reason)."""

    def __init__(
        self,
        net: nn.Module,
        cache: str | os.PathLike | None = None,
        *,
        compile_missing: bool = True,
        note: str | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.cache = Path(cache) if cache is not None else aot_cache_dir()
        self.compile_missing, self.note = compile_missing, note
        floating = [p for p in net.parameters() if p.is_floating_point()]
        self.dtype = floating[0].dtype if floating else torch.float32
        self._digest: str | None = None
        self._runners: dict[tuple, Any] = {}
        self._paths: dict[tuple, Path] = {}
        self._loaded: dict[Path, Any] = {}  # package -> its loaded runner
        self._from_cache: set[tuple] = set()  # signatures whose package was in the cache already
        self.compiled = self.loaded = 0  # packages compiled / loaded from the cache by this instance

    def __getstate__(self) -> dict:
        # a loaded package is a C++ runner, neither copied nor pickled: a copy loads it again
        # from the cache at its first call
        state = super().__getstate__()
        state["_runners"], state["_loaded"] = {}, {}
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
        if self.note is not None:  # auto's choice, once per sampling call: a package found, or its rule
            found = runner is not False and signature in self._from_cache
            print(f"compile: aot (auto: a package for these inputs is in the cache: {self._paths[signature]})"
                  if found else self.note, file=sys.stderr, flush=True)  # fmt: skip
            self.note = None
        if runner is False:  # no package (torch.export could not trace it, or auto found none): eager
            return self.net(z_t, t, cond)
        return runner(*args)

    def _package(self, signature: tuple, keys: tuple[str, ...], args: tuple[Tensor, ...]) -> Any:
        quiet_cpp_extension_log()
        if any(a.device.type != "cpu" for a in args):
            raise AOTError("compile=aot runs on the CPU only (measured there); use compile=auto on CUDA")
        if not self.compile_missing and not any(self.cache.glob("denoiser-*.pt2")):
            return False  # nothing to load: no digest of the weights either
        # one package serves every batch size: the first dimension of each input that shares
        # z_t's batch is dynamic; a denoiser that export cannot trace so gets one per shape
        batched = tuple(a.dim() > 0 and a.shape[0] == args[0].shape[0] for a in args)
        any_batch = (keys, *(((("B", *a.shape[1:]) if b else tuple(a.shape)), str(a.dtype))
                             for a, b in zip(args, batched, strict=True)))  # fmt: skip
        dynamic = self.cache / f"denoiser-{self.key(any_batch)}.pt2"
        static = self.cache / f"denoiser-{self.key(signature)}.pt2"
        path = self._paths[signature] = next((p for p in (dynamic, static) if p.is_file()), None)
        if path is not None and self._load(path) is not None:
            self._from_cache.add(signature)
            return self._loaded[path]
        if not self.compile_missing:
            return False
        limit = cache_limit()  # a bad LDMKIT_AOT_CACHE_GB is said before the compile, not after
        if self.note is not None:  # auto chose to compile: its line first
            print(self.note, file=sys.stderr, flush=True)
            self.note = None
        shapes = ", ".join("x".join(map(str, shape)) for shape, _ in any_batch[1:])
        print(f"compile=aot: compiling {type(self.net).__name__} ahead of time for inputs {shapes} (once: later "
              f"runs load it from {self.cache})", file=sys.stderr, flush=True)  # fmt: skip
        try:
            try:
                path = self._compile(dynamic, keys, args, batched)
            except Exception as err:
                if not any(batched) or isinstance(err, AOTError):
                    raise
                path = self._compile(static, keys, args, None)  # the batch size as it is
        except Exception as err:  # export/compile of a denoiser it cannot trace: stay eager
            warnings.warn(
                f"compile=aot: {type(self.net).__name__} could not be compiled ahead of time ({_first_line(err)}); "
                "it samples eagerly",
                stacklevel=4,
            )
            return False
        self._paths[signature] = path
        self.compiled += 1
        removed = prune_cache(self.cache, limit, keep=[path]) if limit is not None else []
        if removed:
            print(f"compile=aot: the cache {self.cache} keeps at most LDMKIT_AOT_CACHE_GB={limit / 2**30:g} GB: "
                  f"removed {len(removed)} package(s) used least recently", file=sys.stderr, flush=True)  # fmt: skip
        return self._load(path, compiled=True)

    def _load(self, path: Path, *, compiled: bool = False) -> Any:
        """The runner of the package at ``path``, loaded once (batch sizes that share a package
        share it). A cached package that cannot be loaded (cut short by a full disk or a copy,
        written by a torch whose loader differs) is moved aside to ``*.unreadable``, with a
        warning naming it, and gives None: its inputs are compiled again (``compile=aot``) or
        run eagerly (``auto``), not one failed sampling call after another."""
        if path in self._loaded:
            return self._loaded[path]
        if not compiled:
            with contextlib.suppress(OSError):  # used now: the last to go when the cache is pruned
                os.utime(path)
        try:
            runner = load_package(path)
        except Exception as err:
            if compiled:  # just written by this process: nothing stale to set aside
                raise
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            warnings.warn(
                f"compile=aot: the cached package {path} cannot be loaded ({_first_line(err)}); "
                f"moved aside to {aside.name}; "
                + ("compiling it again" if self.compile_missing else "these inputs sample eagerly"),
                stacklevel=5,
            )
            return None
        self._loaded[path] = runner
        if not compiled:
            self.loaded += 1
        return runner

    def _compile(
        self, path: Path, keys: tuple[str, ...], args: tuple[Tensor, ...], batched: tuple[bool, ...] | None
    ) -> Path:
        """Export and compile into ``path`` (atomically); ``batched``: inputs whose first
        dimension is the batch, made dynamic (None: every shape as it is)."""
        import torch._inductor.config as inductor_config

        flat = _Flat(self.net, keys, self.dtype).eval()
        dynamic_shapes = None
        if batched is not None:
            # traced at batch 2 or more: export specialises a size of 1, which would pin it
            size = max(2, args[0].shape[0])
            args = tuple(a.expand(size, *a.shape[1:]) if b else a for a, b in zip(args, batched, strict=True))
            batch = torch.export.Dim("batch", min=1)
            specs = [{0: batch} if b else None for b in batched]
            dynamic_shapes = (specs[0], specs[1], tuple(specs[2:]))
        # traced outside the caller's autocast and inference mode: the package is the same
        # whatever context compiled it (the casts autocast would make are _Flat's)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
            example = tuple(a.clone() for a in args)  # not inference tensors
            exported = torch.export.export(flat, example, dynamic_shapes=dynamic_shapes)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")  # aoti writes .pt2 names only
        freezing = inductor_config.freezing
        inductor_config.freezing = True  # the weights folded in: the CPU inference recipe
        try:
            # inductor freezes (folds the weights in, packs them for oneDNN, fuses) only with
            # gradients off: compiled with them on, the forward ran 1.2x slower on the AMX host
            with torch.no_grad():
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, path)  # whole or absent: a reader never loads half a package
        finally:
            inductor_config.freezing = freezing
            partial.unlink(missing_ok=True)
        return path
