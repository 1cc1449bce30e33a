"""File locks for a prefix and for the package cache (flock on POSIX).  A second run waits and says for whom
("waiting for … (pid N)"), or fails at once with --no-wait.

The protocol is the one that holds on NFS (Linux maps flock to fcntl byte-range locks there, served by the
server's lock manager): lock files are kept — created once, never removed by the run that holds them — so no
holder ever locks a file that another run has removed or that the NFS client silly-renamed (.nfsXXXX) while it
was open, and nothing depends on attribute caches agreeing about which inode a path names.  Only uninstall (for
the prefix it removes) and a refused install of a new prefix remove a prefix's lock file, after releasing it; a
waiter that got the lock on such a removed file notices — it opens the path afresh (an open revalidates with the
server: NFS close-to-open consistency) and compares the inode — and starts over on the new file.
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
            check = os.open(path, os.O_RDONLY)  # a fresh open, not a (possibly cached) stat
            try:
                now, held_st = os.fstat(check), os.fstat(fd)
                same = (now.st_dev, now.st_ino) == (held_st.st_dev, held_st.st_ino) and held_st.st_nlink > 0
            finally:
                os.close(check)
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
        note = f"{os.getpid()}\n".encode()  # who holds it, for the next run's "waiting for" message
        os.pwrite(fd, note, 0)
        if os.fstat(fd).st_size != len(note):  # a longer note of an earlier holder: cut (a truncate costs a journal write)
            os.ftruncate(fd, len(note))
        yield
    finally:
        os.close(fd)  # the file stays (see the module's docstring)


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
