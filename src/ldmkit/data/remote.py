"""Reading shards and manifests that are not local files: through webdataset's ``gopen`` (curl
for ``http(s)://``, a shell for ``pipe:CMD``, its other schemes likewise), with retries.

A transfer that breaks off (curl's ``transfer closed with bytes remaining``, a command that
exits non-zero, fewer bytes than the manifest says) is retried after a growing pause
(``Retry``); each retry is a ``RetryEvent`` (logged once, counted in ``DataStats.retries``).
After ``Retry.attempts`` retries, or at once for an answer that retrying cannot change (an HTTP
error: curl ``-f`` exits 22, having already retried 408/429/5xx answers itself), the read fails
with a ``DataError`` naming the location.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlparse

from webdataset.gopen import gopen, gopen_schemes

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


def scheme_of(location: str) -> str:
    """``pipe``, a URL scheme (``http``, ``file``, ``s3``...), or "" for a local path (a
    one-letter scheme is a Windows drive)."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(location).scheme
    return scheme.lower() if len(scheme) > 1 else ""


def streamable(scheme: str) -> bool:
    """Whether webdataset's ``gopen`` opens locations of ``scheme`` (besides local files)."""
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
    waits ``delay * 2**(n-1)`` seconds, at most ``max_delay``."""

    attempts: int = 5
    delay: float = 1.0
    max_delay: float = 60.0

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


class StreamReader:
    """One read of ``location`` through ``gopen``: a file-like object that counts the bytes
    it hands out and, at the end, says whether the transfer completed (``finish``)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.bytes = 0
        self.eof = False
        try:
            self._pipe = gopen(location, "rb", bufsize=BUFFER)
        except (OSError, ValueError) as exc:  # no curl; WDS_SECURE=1 refuses pipe:
            raise DataError(f"cannot read {location}: {exc}") from exc
        # the pipe's own read() polls the child after every call; the exit status is checked
        # once, at the end (finish)
        self._stream = getattr(self._pipe, "stream", self._pipe)
        self._process = getattr(self._pipe, "proc", None)

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
        if status not in getattr(self._pipe, "ignore_status", [0]):
            if scheme_of(self.location) == "pipe":
                return Failure(f"the command exited with status {status}")
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

    def close(self) -> None:
        """Stop the transfer (a no-op once it finished)."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(OSError):
                self._process.kill()
        with contextlib.suppress(OSError, ValueError):
            self._wait()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def fetch(location: str, retry: Retry = Retry()) -> bytes:
    """The whole content at ``location`` (a manifest), retried like a shard."""
    for attempt in range(1, retry.attempts + 2):
        with StreamReader(location) as reader:
            data = reader.read()
            failure = reader.outcome()
        if failure is None:
            return data
        retry.after(location, failure, attempt, lambda event: logger.warning("%s", event))
    raise AssertionError("unreachable")  # pragma: no cover - after() raises on the last attempt
