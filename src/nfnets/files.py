"""Files that are written whole or not at all, and what to say when the disk refuses.

Every checkpoint, weights file and run record goes through ``atomic_write``: the content is
written to a temp file beside its destination, flushed to disk, then renamed over it, so a
crash, a signal or a full disk leaves either the old file or the new one, never a mix. The temp
files of a process killed mid-write (SIGKILL cannot be caught) are recognisable by name and
removed by ``remove_temp_files`` when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import RunFailed

__all__ = ["atomic_write", "disk_error", "free_space", "remove_temp_files", "sha256_file"]

# ".<name>.<12 hex>.tmp": hidden, and specific enough that no user file is mistaken for one.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")

# What a full, over-quota, read-only or forbidden destination raises.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.EFBIG}


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: all or nothing.

    The temp file lives in the same directory (so the rename is atomic); an interrupted or
    failing write leaves any previous file at ``path`` intact and no temp file behind. A full,
    read-only or forbidden destination raises ``RunFailed`` with one line saying what could not
    be written and how much space is free.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        failure = disk_error(path, err)
        if failure is not None:
            raise failure from None
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_error(path: str | os.PathLike, err: BaseException) -> RunFailed | None:
    """A one-line ``RunFailed`` if ``err`` means the disk refused to store ``path``, else None.

    Writers that go through a C++ stream (``torch.save``) lose the errno and raise a
    RuntimeError ("file write failed"); an almost-full disk is then taken as the cause.
    """
    path = Path(path)
    free = free_space(path.parent)
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        reason = os.strerror(err.errno)
    elif isinstance(err, RuntimeError) and free is not None and free < 64 << 20:
        reason = "the write failed with the disk (almost) full"
    else:
        return None
    space = "" if free is None else f"; {_human(free)} free on {path.parent}"
    return RunFailed(f"could not write {path}: {reason}{space}")


def free_space(directory: str | os.PathLike) -> int | None:
    """Bytes free for this user in ``directory`` (None if it cannot be told)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files ``atomic_write`` left in ``directory`` when a process was killed.

    Only call this while holding the folder (``nfnets.lock.RunLock``): another writer's temp
    file is indistinguishable from a leftover. Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if _TEMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
