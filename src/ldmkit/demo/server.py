"""``ldmkit demo``'s process: :func:`serve` writes everything in one private temporary folder
(the results, the uploads and Gradio's copies of both), serves the page from it until Ctrl-C
or SIGTERM, then deletes the folder.

Gradio is imported here only once ``GRADIO_TEMP_DIR`` names a folder inside it: Gradio reads
that variable when it is imported as well as after, and would otherwise write to
``/tmp/gradio``, which outlives the server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from ldmkit.errors import LdmkitError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class AddressError(LdmkitError):
    """``ldmkit demo`` cannot listen on the ``--host`` and ``--port`` given."""


def serve(*, checkpoint: Path, host: str, port: int, queue_size: int, device: str) -> int:
    """Load ``checkpoint`` and serve its page until interrupted (Ctrl-C or SIGTERM). Without
    Gradio, raises ``ModuleNotFoundError`` (name ``gradio``) before loading anything. Sets
    PIL's image size limit for the rest of the process."""
    from ldmkit.devices import sampling_device

    device = sampling_device(device)  # one that exists here, before Gradio loads
    with (
        _sigterm_interrupts(),
        tempfile.TemporaryDirectory(prefix="ldmkit-demo-") as results,
        _environ("GRADIO_TEMP_DIR", str(Path(results) / "gradio")),
    ):
        from PIL import Image

        from ldmkit.demo import app  # imports Gradio
        from ldmkit.demo.form import max_side
        from ldmkit.demo.session import DemoSession
        from ldmkit.pipeline import Pipeline

        pipeline = Pipeline.load(checkpoint, device=device)
        check_address(host, port)
        # no image of more pixels than the page takes (max_side²) is decoded, here or in
        # Gradio: PIL refuses it from its header, and the page says so in one line
        Image.MAX_IMAGE_PIXELS = max_side(pipeline) ** 2
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        session = DemoSession(
            pipeline, checkpoint=Path(checkpoint), device=device, results_dir=Path(results)
        )
        if host not in LOCAL_HOSTS:
            print(
                f"ldmkit demo: warning: serving on {host}: anyone who can reach this machine can use "
                "the model (there is no login)",
                file=sys.stderr,
            )
        app.launch(session, host=host, port=port, queue_size=queue_size)
    return 0


def check_address(host: str, port: int) -> None:
    """Raise :class:`AddressError`, naming ``--host`` or ``--port``, when nothing can listen
    on ``host:port`` now (Gradio would say "Cannot find empty port" for both, and point to
    its own settings): a name that does not resolve, an address not of this machine, a port
    in use or reserved."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise AddressError(f"--host {host}: no such address ({err.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            reason = {
                errno.EADDRINUSE: f"--port {port} on {host} is in use: choose another --port",
                errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine",
                errno.EACCES: f"--port {port}: permission denied (ports below 1024 need root)",
            }.get(err.errno, f"cannot listen on {host}:{port}: {err.strerror}")
            raise AddressError(reason) from None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the block as Ctrl-C does (a KeyboardInterrupt: the folder is deleted on
    the way out); the previous handler back after it."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals go to the main one
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, the previous value back after it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
