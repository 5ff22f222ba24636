"""The ``ldmkit`` command: ``train``, ``sample``, ``evaluate``, ``data``, ``plugins``, ``demo``,
``convert``, ``lora``.

Everything after the subcommand that looks like ``key=value`` is a Hydra override::

    ldmkit sample sampler=ddim sampler.steps=20 --num-samples 16 --out grid.png
    ldmkit train stage=autoencoder first_stage=kl_f4_small trainer.max_steps=2000

Owns the argument parsing and the one-line error reporting of every subcommand. May import
anything in ldmkit (it is an entry point, layer 6 in docs/architecture.md); nothing imports it
except ``ldmkit.__main__`` and ``ldmkit.demo``.

One module per subcommand (``train`` holds ``evaluate`` too),
what they share in ``common``. ``SUBCOMMANDS`` names each handler through its module, so
that ``ldmkit.cli.train`` & co. stay modules, not the functions of the same name.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ldmkit.cli import common, convert, data, demo, lora, plugins, sample, train
from ldmkit.errors import LdmkitError
from ldmkit.io import as_write_error

SUBCOMMANDS = {
    "train": (train.train, "train a stage (stage=autoencoder | ldm | a plugin's; `ldmkit plugins` lists them) from Hydra overrides"),
    "sample": (sample.sample, "sample images into a PNG grid"),
    "evaluate": (train.evaluate, "evaluate a trained model and write JSON metrics"),
    "data": (data.data, "prepare and inspect datasets (webdataset shards)"),
    "plugins": (plugins.plugins, "list installed plugins and what they register"),
    "demo": (demo.demo, "serve a web page for a trained pipeline (pip install 'ldmkit[demo]')"),
    "lora": (lora.lora, "bake a LoRA run's adapter into a pipeline folder, or export it for diffusers (lora merge|export-diffusers)"),
    "convert": (convert.convert, "import the paper's checkpoints, convert to and from diffusers (convert compvis|to-diffusers|from-diffusers)"),
}


def _usage() -> str:
    lines = ["usage: ldmkit <command> [options] [key=value overrides ...]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`ldmkit <command> --help` (or `ldmkit help <command>`) describes each command;",
              "-V, --version prints the version."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "help" and argv[1] in SUBCOMMANDS:
        argv = [argv[1], "--help"]
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from ldmkit._version import __version__

        print(f"ldmkit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ldmkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    handler, help_ = SUBCOMMANDS[name]
    _short_plugin_warnings(name)
    try:
        return handler(rest, prog=f"ldmkit {name}", description=help_)
    except (common.CLIError, LdmkitError) as err:
        print(f"ldmkit {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ldmkit {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`ldmkit ... --print-config | head`): stop quietly, as
        # cat does; stdout goes to /dev/null so the flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a death by SIGPIPE reports
    except Exception as err:
        # a read-only or full disk, wherever the write was: one line naming the path
        problem = as_write_error(err)
        if problem is None:
            raise
        message = str(problem)
        if problem is not err and problem.errno in (errno.EACCES, errno.EPERM):
            message = f"cannot access {problem.filename}: {problem.strerror}"  # reading, maybe
        print(f"ldmkit {name}: error: {message}", file=sys.stderr)
        return 1


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script (and ``python -m ldmkit``): :func:`main`, then :func:`exit_now`."""
    exit_now(main(argv))


def exit_now(code: int) -> NoReturn:
    """End the process as the interpreter's own shutdown would (non-daemon threads joined,
    atexit handlers run, objects held only by reference cycles finalized, the standard streams
    flushed) but without tearing down every module one by one: with torch imported that
    teardown alone took 0.7-1.3 s of every command (2-core host). Nothing of ldmkit's is
    left to it: its files are closed (and written atomically) before ``main`` returns."""
    import atexit
    import gc
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream already closed
            pass
    os._exit(code)


def _short_plugin_warnings(name: str) -> None:
    """Print ldmkit's own warnings as one line each, without the source location: plugin
    load warnings as ``ldmkit: warning: ...``, the others (raised by ldmkit's or a first-party
    plugin's code, e.g. guidance over an untrained null condition) as ``ldmkit NAME:
    warning: ...``. Other libraries' warnings keep Python's format."""
    import warnings

    from ldmkit.plugins import PluginLoadWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PluginLoadWarning):
            print(f"ldmkit: warning: {message}", file=file or sys.stderr)
        elif category.__module__.startswith("ldmkit") or str(filename).startswith(_ldmkit_roots()):
            print(f"ldmkit {name}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@functools.cache
def _ldmkit_roots() -> tuple[str, ...]:
    """The folders of ldmkit's and its first-party plugins' code (a warning raised there is
    ldmkit's, whatever its category)."""
    import importlib.util
    from pathlib import Path

    roots = []
    for package in ("ldmkit", "ldmkit_autoencoders", "ldmkit_conditioners", "ldmkit_samplers", "ldmkit_text",
                    "ldmkit_unet"):  # fmt: skip
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            roots += [str(Path(location)) + os.sep for location in spec.submodule_search_locations]
    return tuple(roots)
