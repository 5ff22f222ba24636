"""Reading shards and manifests that are not local files: through webdataset's ``gopen`` (curl
for ``http(s)://``, a shell for ``pipe:CMD``, its other schemes likewise), with retries.

A transfer that breaks off (curl's ``transfer closed with bytes remaining``, a command that
exits non-zero, fewer bytes than the manifest says) is retried after a growing pause
(``Retry``); each retry is a ``RetryEvent`` (logged once, counted in ``DataStats.retries``).
After ``Retry.attempts`` retries, or at once for an answer that retrying cannot change (an HTTP
error: curl ``-f`` exits 22, having already retried 408/429/5xx answers itself; a ``pipe:``
command the shell cannot find or run, status 127 or 126), the read fails with a ``DataError``
naming the location.

A stream that sends nothing for ``Retry.stall_timeout`` seconds (a server that stops sending
but keeps the connection open, a command that stops writing but does not exit) is a broken
transfer too: its command is killed (a ``pipe:`` command with everything it started: it runs
in a session of its own) and the read goes on as for a transfer cut short.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar
from urllib.parse import urlparse

from ldmkit.data.errors import DataError
from ldmkit.data.stats import RetryEvent

logger = logging.getLogger("ldmkit.data")

BUFFER = 1 << 20
# curl's exit statuses a user meets (curl(1), "EXIT CODES"); the rest are shown as numbers
CURL_EXITS = {
    6: "could not resolve the host",
    7: "could not connect",
    18: "the transfer was cut short",
    22: "the server answered with an HTTP error",
    28: "the operation timed out",
    35: "the TLS handshake failed",
    52: "the server sent nothing",
    55: "sending failed",
    56: "receiving failed",
}
HTTP_ERROR = 22
# the shell's statuses for a command it cannot run: retrying cannot help (as with curl's 22)
SHELL_EXITS = {126: "the command cannot be run", 127: "command not found"}
T = TypeVar("T")
# a command in a session of its own can be killed with its children; the stall watch polls
POSIX = os.name == "posix" and hasattr(select, "poll")


def scheme_of(location: str) -> str:
    """``pipe``, a URL scheme (``http``, ``file``, ``s3``...), or "" for a local path (a
    one-letter scheme is a Windows drive)."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(location).scheme
    return scheme.lower() if len(scheme) > 1 else ""


def streamable(scheme: str) -> bool:
    """Whether webdataset's ``gopen`` opens locations of ``scheme`` (besides local files)."""
    from webdataset.gopen import gopen_schemes  # webdataset imports torch: not for local paths

    return scheme in gopen_schemes and scheme != "__default__"


def is_stream(location: str) -> bool:
    """Whether ``location`` is read through ``gopen`` rather than as a local file."""
    return streamable(scheme_of(location))


class Failure(NamedTuple):
    reason: str
    permanent: bool = False  # retrying cannot help (an HTTP error answer)


@dataclass(frozen=True)
class Retry:
    """How often, and after how long a pause, a broken transfer is tried again: the n-th retry
    waits ``delay * 2**(n-1)`` seconds, at most ``max_delay``. A stream that sends no byte for
    ``stall_timeout`` seconds is broken too (None: it may wait forever)."""

    attempts: int = 5
    delay: float = 1.0
    max_delay: float = 60.0
    stall_timeout: float | None = 120.0

    def pause(self, retry: int) -> float:
        return min(self.max_delay, self.delay * 2 ** (retry - 1))

    def after(
        self, location: str, failure: Failure, retry: int, on_retry: Callable[[RetryEvent], None]
    ) -> None:
        """Wait before retry number ``retry`` of ``location`` (reported to ``on_retry``), or
        raise the ``DataError`` that ends it."""
        if failure.permanent or retry > self.attempts:
            after = f" (after {retry - 1} retries)" if retry > 1 else ""
            raise DataError(f"cannot read {location}: {failure.reason}{after}")
        event = RetryEvent(location, retry, self.attempts, failure.reason, self.pause(retry))
        on_retry(event)
        time.sleep(event.wait)


def _open(location: str) -> tuple[object, bool]:
    """``gopen(location)``, but a ``pipe:`` command runs in a session of its own (gopen's
    runs it in ours), so that killing it kills what it started too; and whether it does."""
    from webdataset import utils as wds_utils
    from webdataset.gopen import Pipe, gopen, rewrite_url

    url = rewrite_url(location)
    if not (POSIX and url.startswith("pipe:")):
        return gopen(url, "rb", bufsize=BUFFER), False
    if wds_utils.enforce_security:  # as gopen's pipe: handler
        raise ValueError("gopen_pipe: unsafe_gopen is False, cannot open pipe URLs")
    pipe = Pipe(url[5:], mode="rb", shell=True, bufsize=BUFFER, ignore_status=[141],
                start_new_session=True)  # fmt: skip
    return pipe, True


class _Watched(io.RawIOBase):
    """A command's output pipe that ends, like a transfer cut short, once no byte arrived for
    ``timeout`` seconds: then ``on_stall()`` (which kills the command). One ``poll`` per read
    of the pipe (up to its 64 KiB), not per byte."""

    def __init__(self, raw: io.RawIOBase, timeout: float, on_stall: Callable[[], None]) -> None:
        super().__init__()
        self._raw, self._on_stall, self.stalled = raw, on_stall, False
        self._timeout_ms = min(math.ceil(timeout * 1000), 2**31 - 1)  # poll takes a C int
        self._poll = select.poll()
        self._poll.register(raw.fileno(), select.POLLIN)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer) -> int | None:
        if self.stalled:
            return 0
        if not self._poll.poll(self._timeout_ms):  # no byte (nor the end) in time
            self.stalled = True
            self._on_stall()
            return 0
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class StreamReader:
    """One read of ``location`` through ``gopen``: a file-like object that counts the bytes
    it hands out and, at the end, says whether the transfer completed (``finish``). With a
    ``stall_timeout``, a stream that sends nothing for that long is ended (its command killed)
    and reported as broken."""

    def __init__(self, location: str, stall_timeout: float | None = None) -> None:
        self.location = location
        self.bytes = 0
        self.eof = False
        self.stall_timeout = stall_timeout
        try:
            self._pipe, self._session = _open(location)
        except (OSError, ValueError) as exc:  # no curl; WDS_SECURE=1 refuses pipe:
            raise DataError(f"cannot read {location}: {exc}") from exc
        # the pipe's own read() polls the child after every call; the exit status is checked
        # once, at the end (finish)
        self._stream = getattr(self._pipe, "stream", self._pipe)
        self._process = getattr(self._pipe, "proc", None)
        self._watch = None
        if stall_timeout is not None and self._process is not None and POSIX:
            raw = getattr(self._stream, "raw", self._stream)
            self._watch = _Watched(raw, stall_timeout, self._kill)
            self._stream = io.BufferedReader(self._watch, BUFFER)

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.bytes += len(data)
        if size < 0 or len(data) < size:  # a buffered read is short only at the end
            self.eof = True
        return data

    def finish(self, expected_bytes: int | None = None) -> Failure | None:
        """Read to the end (a tar's zero padding) and wait for the transfer: None when it
        completed, else why not."""
        try:
            while self.read(BUFFER):
                pass
        except OSError as exc:
            return Failure(f"reading failed: {exc}")
        return self.outcome(expected_bytes)

    def outcome(self, expected_bytes: int | None = None) -> Failure | None:
        """Once the stream has ended: how the transfer went (None: completely)."""
        status = self._wait()
        if self._watch is not None and self._watch.stalled:
            return Failure(f"no data for {self.stall_timeout:g} s")
        if status not in getattr(self._pipe, "ignore_status", [0]):
            if scheme_of(self.location) == "pipe":
                what = SHELL_EXITS.get(status)
                # a command the shell cannot find or run fails the same way every time
                return Failure(f"the command exited with status {status}" + (f" ({what})" if what else ""),
                               what is not None)  # fmt: skip
            what = CURL_EXITS.get(status, "see curl(1), EXIT CODES")
            return Failure(f"curl exited with status {status} ({what})", status == HTTP_ERROR)
        if expected_bytes is not None and self.bytes < expected_bytes:
            return Failure(f"the stream ended after {self.bytes} of {expected_bytes} bytes")
        return None

    def _wait(self) -> int | None:
        self._stream.close()
        if self._process is None:
            return 0
        status = self._process.wait()
        self._pipe.status = status  # the pipe's close() has nothing left to check
        return status

    def _kill(self) -> None:
        """Kill the command unless it has ended (a ``pipe:`` command's whole session: it is
        the leader, and not yet waited for, so the id is still its own)."""
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if self._session:
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.kill()

    def close(self) -> None:
        """Stop the transfer (a no-op once it finished)."""
        self._kill()
        with contextlib.suppress(OSError, ValueError):
            self._wait()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_retried(location: str, retry: Retry, read: Callable[[StreamReader], T]) -> T:
    """``read(reader)`` of a whole transfer of ``location``, retried while it breaks off."""
    for attempt in range(1, retry.attempts + 2):
        with StreamReader(location, retry.stall_timeout) as reader:
            result = read(reader)
            failure = reader.outcome()
        if failure is None:
            return result
        retry.after(location, failure, attempt, lambda event: logger.warning("%s", event))
    raise AssertionError("unreachable")  # pragma: no cover - after() raises on the last attempt


def stream_digest(location: str, retry: Retry = Retry()) -> tuple[int, str]:
    """Size and sha256 of what ``location`` streams (a shard), hashed as it arrives (never
    held whole) and retried like a shard's read."""

    def digest(reader: StreamReader) -> tuple[int, str]:
        hasher = hashlib.sha256()
        while chunk := reader.read(BUFFER):
            hasher.update(chunk)
        return reader.bytes, hasher.hexdigest()

    return _read_retried(location, retry, digest)


def fetch(location: str, retry: Retry = Retry()) -> bytes:
    """The whole content at ``location`` (a manifest), retried like a shard."""
    return _read_retried(location, retry, lambda reader: reader.read())
