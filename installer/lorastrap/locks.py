"""File locks for a prefix and for the package cache (the `filelock` package: flock on POSIX).  A second run
waits and says for whom ("waiting for … (pid N)"), or fails at once with --no-wait.  Works on NFS where the
server supports byte-range locks (Linux maps flock to fcntl there)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import filelock

from lorastrap.errors import BusyError


@contextmanager
def held(path: Path, *, what: str, wait: bool = True, narrate=lambda msg: None, timeout: float | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _holder(path)
        if not wait:
            raise BusyError(f"{what} is locked by another lorastrap run{holder}", why=f"lock file {path}",
                            fix="Wait for it to finish, or run again without --no-wait to wait for it.")
        narrate(f"waiting for another lorastrap run to release {what}{holder}…")
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=0.1)
        except filelock.Timeout:
            raise BusyError(f"{what} stayed locked for {timeout:.0f} s", why=f"lock file {path}",
                            fix="Check for a hung lorastrap process.")
    try:
        with open(path, "r+") as f:  # who holds it, for the next run's "waiting for" message
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
        return f" (pid {pid})" if pid else ""
    except OSError:
        return ""
