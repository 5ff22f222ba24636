"""One trainer per run folder.

The trainer holds an exclusive ``flock`` on ``<run_dir>/.lock`` for its whole run; the file
says who holds it (PID, host, start time). A second trainer on the same folder stops before it
reads or writes anything there, with one line naming the holder. The kernel drops the lock
when the holding process ends, however it ends (SIGKILL included), so a killed run never
leaves its folder locked; the file itself stays (deleting a lock file races with a process
about to lock it). DataLoader workers and other children forked by the trainer close their
copy of the descriptor, so a worker outliving a killed trainer does not keep the lock.

``flock`` also works on NFS (Linux emulates it with POSIX locks there). Without ``fcntl``
(Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ldmkit.errors import LdmkitError
from ldmkit.io import WriteError, reporting_write_errors
from ldmkit.training import distributed
from ldmkit.training.errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"

# the descriptors of the locks this process holds; a forked child closes them (closing a
# copy does not release the lock: only the parent's close, or its death, does)
_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunDirInUseError(LdmkitError, RuntimeError):
    """Another process trains in this run folder (the message names its PID)."""


class RunLock:
    """The lock of one run folder: :meth:`acquire` creates the folder if needed and raises
    :class:`RunDirInUseError` when another process holds it; :meth:`release` gives it back
    (and removes the folder again if this lock created it and nothing else was written)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        while self._fd is None:
            self._created = self._make_folder() or self._created
            with reporting_write_errors(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirInUseError(
                    f"run_dir {self.run_dir} is in use by {_holder(self.path)}; wait for it to "
                    f"end or choose another run_dir"
                ) from None
            if _is_at(fd, self.path):
                self._fd = fd
            else:  # its holder removed the file while we opened it: lock the one there now
                os.close(fd)
        _held.add(self._fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        with contextlib.suppress(OSError):  # who holds it is for the message only
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a folder made for a run that wrote nothing: gone again
            if self._created and os.listdir(self.run_dir) == [LOCK_FILE]:
                self.path.unlink()
                self.run_dir.rmdir()
        _held.discard(self._fd)
        os.close(self._fd)  # releases the lock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _make_folder(self) -> bool:
        """Create the run folder; True if it was not there."""
        if self.run_dir.is_dir():
            return False
        if self.run_dir.exists() or self.run_dir.is_symlink():
            raise WriteError(self.run_dir, errno.ENOTDIR, "run_dir must be a folder")
        with reporting_write_errors(self.run_dir):
            try:
                self.run_dir.mkdir(parents=True)
            except FileExistsError:  # another trainer made it just now
                return False
            except NotADirectoryError as err:
                raise WriteError(self.run_dir, errno.ENOTDIR, "a folder on its path is a file") from err
        return True


@contextlib.contextmanager
def locked_for_all_ranks(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs. Under torchrun rank 0 holds it for all
    ranks; when it is taken every rank stops with the same line."""
    lock, problem = RunLock(run_dir), None
    if distributed.distributed_info()[0] == 0:
        try:
            lock.acquire()
        except LdmkitError as err:
            problem = err
    shared = distributed.broadcast_object(None if problem is None else str(problem))
    if shared is not None and problem is None:
        problem = TrainingError(shared)  # rank 0's error, as this rank's
    if problem is not None:
        raise problem
    try:
        yield
    finally:
        lock.release()


def _is_at(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: Path) -> str:
    """'PID 1234 (started 2025-01-02 10:00:00)' from the lock file, as far as it says."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        pid, host, started = int(record["pid"]), str(record["host"]), str(record["started"])
    except (OSError, ValueError, KeyError, TypeError):  # it is being written this instant
        return "another process"
    where = "" if host == socket.gethostname() else f" on {host}"
    return f"PID {pid}{where} (started {started})"
