"""Crash-safe file writing: write beside the target, fsync, then atomically rename.

A temporary file is named ``.<target name>.<pid>-<random>.tmp``. A process killed between
creating it and the rename (SIGKILL, power loss) leaves it behind; the next write of the same
target, and :func:`remove_stale_temporaries` (the trainer calls it on start), delete the
leftovers of processes that no longer run, so no empty or partial temporaries accumulate.
The file that replaces the target gets the mode a plain ``open()`` would give it (``0o666``
less the umask, :func:`follow_umask`), whatever the writer or ``mkstemp`` made it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ldmkit.errors import LdmkitError

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")

# the errors a file system answers a write with when the disk, not the program, is the problem
WRITE_FAILURES = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the file size limit, `ulimit -f`, was reached)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a folder",
}


class WriteError(LdmkitError, OSError):
    """A file or folder could not be written: read-only or full disk, quota, file size limit,
    no permission. ``filename`` is what was being written; ``errno`` says why. What was
    written before is left as it was (every ldmkit write is atomic)."""

    def __init__(self, path: str | os.PathLike, code: int, note: str | None = None) -> None:
        super().__init__(code, WRITE_FAILURES.get(code, os.strerror(code)), str(path))
        self.note = note

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}" + (f"; {self.note}" if self.note else "")

    def __reduce__(self):
        return (type(self), (self.filename, self.errno, self.note))


def write_failure(err: BaseException, path: str | os.PathLike | None = None) -> int | None:
    """The errno of ``err`` (or of an error it was raised from) when the file system refused
    a write (:data:`WRITE_FAILURES`); native writers that hide it (safetensors: "os error 28",
    torch.save: "unexpected pos") are diagnosed from ``path``'s file system. None otherwise."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in WRITE_FAILURES:
            return cause.errno
        code = re.search(r"os error (\d+)", str(cause))
        if code and int(code[1]) in WRITE_FAILURES:
            return int(code[1])
        cause = cause.__cause__ or cause.__context__
    return _diagnose(Path(path)) if path is not None else None


def _diagnose(path: Path) -> int | None:
    """Why writing at ``path`` fails, asked of its file system: read-only, full, or a file
    beside it at the process's file size limit."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stats.f_blocks == 0:  # a pseudo file system (/proc): it has no blocks to fill
        return None
    if stats.f_bfree == 0 or (os.geteuid() != 0 and stats.f_bavail == 0):
        return errno.ENOSPC
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    if limit != resource.RLIM_INFINITY:
        files = existing.iterdir() if existing.is_dir() else [existing]
        with contextlib.suppress(OSError):
            if any(p.is_file() and p.stat().st_size >= limit for p in files):
                return errno.EFBIG
    return None


def as_write_error(err: BaseException, path: str | os.PathLike | None = None) -> WriteError | None:
    """``err`` as a :class:`WriteError` naming ``path`` (default: the error's own file name)
    when the file system refused a write; None for any other error."""
    if isinstance(err, WriteError):
        return err
    code = write_failure(err, path)
    if code is None:
        return None
    where = path if path is not None else getattr(err, "filename", None)
    return WriteError(where if where is not None else "a file", code)


class NotAFolderError(LdmkitError, NotADirectoryError):
    """A folder cannot be made where a file is: the path itself, or a folder above it."""


def check_folder(folder: str | os.PathLike, label: str) -> None:
    """Raise :class:`NotAFolderError` ("``label``: runs/x is a file, not a folder") when
    ``folder`` cannot be (or become) a folder because it, or a folder above it, is a file."""
    for path in (Path(folder), *Path(folder).parents):
        try:
            if path.is_dir():
                return
            # is_dir again: another process (rank 0 of the same run) may have made it meanwhile
            in_the_way = (path.exists() or path.is_symlink()) and not path.is_dir()
        except OSError:
            return  # cannot look (no permission): the write itself will say
        if in_the_way:
            raise NotAFolderError(f"{label}: {path} is a file, not a folder")


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`WriteError` now if the file ``path`` could not be created (it is a
    folder, or its nearest existing folder is read-only or not writable), or
    :class:`NotAFolderError` if a file stands where a folder above it has to be, so that a long
    command fails before its work rather than after it. A full disk is only found when writing."""
    target = Path(path)
    check_folder(target.parent, f"cannot write {target}")
    if target.is_dir():
        raise WriteError(target, errno.EISDIR, "name a file")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        read_only = False
        with contextlib.suppress(OSError):
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise WriteError(target, errno.EROFS if read_only else errno.EACCES)
    # a pseudo file system such as /proc passes the access check and refuses new files and folders
    if existing.is_dir() and existing != target.parent:  # folders to make: can one be made there?
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".ldmkit-probe-", dir=existing))
        except OSError as err:
            raise WriteError(target, err.errno or errno.EACCES, f"no folder can be made in {existing}") from None
    elif existing.is_dir() and not target.exists():  # can a file be made there?
        try:
            fd, probe = tempfile.mkstemp(prefix=".ldmkit-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise WriteError(target, err.errno or errno.EACCES, f"no file can be made in {existing}") from None


@contextlib.contextmanager
def reporting_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        problem = as_write_error(err, path)
        if problem is None:
            raise
        raise problem from err


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask_from_proc() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return None


# os.umask reads the mask only by setting it, racing threads that create files meanwhile:
# done once, at import, where /proc/self/status has no Umask line (not Linux, or before 4.7)
_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = os.umask(0o022)
    os.umask(_UMASK_AT_IMPORT)


def current_umask() -> int:
    """The process's file mode creation mask, read without changing it."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give the file ``path`` the mode ``open()`` creates files with (``0o666`` less the
    umask: 0644 under umask 022). ``mkstemp`` and safetensors' writer make theirs 0600, which
    leaves a pipeline written for a team, or for a server running as another user, readable
    by its writer alone."""
    with contextlib.suppress(OSError):  # a file system without modes (FAT, some mounts)
        os.chmod(path, 0o666 & ~current_umask())


def process_is_gone(pid: int) -> bool:
    """Whether the process ``pid`` that named a temporary file or folder no longer runs
    (this process's own pid counts as gone: a leftover of an earlier process, in a container)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # exists, owned by someone else
    return False


def remove_stale_temporaries(
    directory: str | os.PathLike, *, target: str | None = None
) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``directory`` (only those for
    ``target`` when given) whose writing process is gone; returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMPORARY.match(path.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if process_is_gone(int(match["pid"])):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    target = Path(target)
    with reporting_write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, target=target.name)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent
        )
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with reporting_write_errors(target):
            yield tmp_path
            follow_umask(tmp_path)
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))
