"""One run per folder: an exclusive lock on ``RUN_DIR/.lock`` held for the whole run.

The lock is a POSIX record lock (``fcntl.lockf``) on the file: the kernel releases it when the
holder exits in any way, SIGKILL included, so a dead run never blocks the folder; it is not
inherited by forked children (DataLoader workers), and NFS carries it through its lock manager.
The file holds the holder's pid, host and start time, only to tell the user who has the folder.
Where the file system has no locks (``ENOLCK``/``EOPNOTSUPP``), the recorded pid decides: a
holder on this host whose process is gone is stale and is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from .errors import UsageError

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".lock"

# Record locks belong to the process, so a second RunLock in the same process would succeed
# (and its close would drop the first); folders held by this process are tracked here.
_HELD: set[str] = set()


class RunLock:
    """Exclusive hold on a run folder; use as a context manager or ``acquire``/``release``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the folder (creating it) or raise UsageError naming the run that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: the recorded pid decides (see the module docstring)
            fcntl = None

        key = os.path.realpath(self.path)
        if key in _HELD:
            raise UsageError(f"{self.directory} is in use by another run in this process")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise UsageError(f"cannot use {self.directory} as a run directory: "
                             f"{err.strerror}") from None
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl on this platform")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                holder = _read_holder(self.path)
                os.close(fd)
                raise UsageError(f"{self.directory} is in use by another run{holder}; wait "
                                 "for it to finish, stop it, or choose another --out") from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self._take_without_locks(fd)  # no record locks on this file system
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        self._key = key
        _HELD.add(key)
        return self

    def _take_without_locks(self, fd: int) -> None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if pid and pid != os.getpid() and (host != socket.gethostname() or _alive(pid)):
            os.close(fd)
            raise UsageError(f"{self.directory} is in use by another run (pid {pid} on "
                             f"{host}); wait for it to finish, stop it, or choose another "
                             "--out")

    def release(self) -> None:
        """Give the folder back (the lock file stays; it is empty while nobody holds it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self._key)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing drops the record lock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
        return f" (pid {holder['pid']} on {holder['host']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
