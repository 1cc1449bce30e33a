"""File locks for a prefix and for the package cache (flock on POSIX).  A second run waits and says for whom
("waiting for … (pid N)"), or fails at once with --no-wait.  Works on NFS where the server supports byte-range
locks (Linux maps flock to fcntl there).

No lock file is left behind: the holder removes it before releasing.  A waiter that then gets the lock on the
removed file sees that the path no longer names the file it locked (another inode, or none) and starts over on
the new one, so two runs can never both hold "the" lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from lorastrap.core.errors import BusyError, NotWritableError

POLL_S = 0.1


def _open_locked(path: Path, blocking: bool) -> int | None:
    """An fd holding the flock on the file now at PATH, or None when another process holds it (not blocking)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we waited: lock the new one


@contextmanager
def held(path: Path, *, what: str, wait: bool = True, narrate=lambda msg: None, timeout: float | None = None):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, blocking=False)
    except (PermissionError, OSError) as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise NotWritableError(f"cannot write beside {what}: {exc.strerror}", why=f"the lock file {path} cannot be "
                               "created there (a read-only filesystem, or no permission)",
                               fix="Choose a --prefix on a writable filesystem, or fix its permissions.")
    if fd is None:
        holder = _holder(path)
        if not wait:
            raise BusyError(f"{what} is locked by another lorastrap run{holder}", why=f"lock file {path}",
                            fix="Wait for it to finish, or run again without --no-wait to wait for it.")
        narrate(f"waiting for another lorastrap run to release {what}{holder}…")
        deadline = None if timeout is None else time.monotonic() + timeout
        while fd is None:
            if deadline is not None and time.monotonic() > deadline:
                raise BusyError(f"{what} stayed locked for {timeout:.0f} s", why=f"lock file {path}",
                                fix="Check for a hung lorastrap process.")
            time.sleep(POLL_S)
            fd = _open_locked(path, blocking=False)
    try:
        os.ftruncate(fd, 0)  # who holds it, for the next run's "waiting for" message
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # still ours: nobody else can hold the file at PATH while we do
        except OSError:
            pass
        os.close(fd)


def held_by_another(path: Path) -> str | None:
    """Whether another run holds the lock at PATH now (its " (pid N)" note, or ""), else None.  Creates nothing,
    takes nothing for longer than the look."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
        return f" (pid {pid})" if pid else ""
    except OSError:
        return ""
