"""A warm interpreter that starts the test suite's ``ldmkit`` commands as forked processes.

An ``ldmkit`` process spends most of a tiny test run importing its libraries: torch (~2.5 s
on a 2-core CI host) and, in every training process, ``torch._dynamo`` (~2.8 s more: torch's
optimizers import it at their first ``add_param_group``). This server imports those
third-party libraries once, then forks one child per command. Each child is a real process
with its own pid, argv, environment, working directory, stdout and stderr files and exit
status; it imports ldmkit itself (nothing of ldmkit is imported here, so every ``LDMKIT_*``
switch and every installed entry point is read afresh), runs ``ldmkit.cli.run`` and ends
as the console script does (``ldmkit.cli.exit_now``: non-daemon threads joined, atexit
handlers run, streams flushed).

The client (``tests/conftest.py``) sends one JSON line per command on stdin and reads one
JSON line back, ``{"rc": ..., "timed_out": ...}``; a command past its timeout is killed
(SIGKILL), as ``subprocess.run`` does. Commands whose environment differs from this
server's in anything but ``LDMKIT_*`` (``PYTHONPATH``, ``HOME``, ``OMP_NUM_THREADS``: read
when an interpreter or a library starts) are run by the client as plain subprocesses.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import time


def preload() -> None:
    """Import the libraries every ldmkit command imports (never ldmkit itself)."""
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (what an optimizer's first add_param_group imports)
    import torch.nn.functional  # noqa: F401
    import torch.utils.data  # noqa: F401
    import torchvision  # noqa: F401  (lpips)

    for name in ("hydra", "hydra.compose", "hydra.initialize", "webdataset", "lpips", "einops", "pluggy", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            pass
    del torch


def child(request: dict) -> None:
    """Become the command: redirect the standard streams, take its cwd, env and argv, run."""
    os.setpgid(0, 0)  # its own process group: a timeout kills what it started too
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(stdin)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["exe"], *request["args"]]
    from ldmkit.cli import run

    run(request["args"])  # as the console script ends: ldmkit.cli.exit_now


def _ends_within(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` ends within ``timeout`` seconds (it is not reaped here)."""
    try:
        watch = os.pidfd_open(pid)  # Linux 5.3+
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.01)
        return False
    try:
        return bool(select.select([watch], [], [], timeout)[0])
    finally:
        os.close(watch)


def serve() -> None:
    preload()
    assert "ldmkit" not in sys.modules, "the zygote must not import ldmkit"
    gc.freeze()  # the children's collections skip (and so do not copy) the preloaded objects
    replies = sys.stdout
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        timed_out = not _ends_within(pid, request["timeout"])
        if timed_out:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
