"""File locks (flock) for a prefix and for the package cache: the second installer waits and says so, or fails
at once with --no-wait.  Works on NFS where the server supports byte-range locks (Linux maps flock to fcntl there)."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from lorastrap.errors import BusyError


@contextmanager
def held(path: Path, *, what: str, wait: bool = True, narrate=lambda msg: None, timeout: float | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise BusyError(f"{what} is locked by another lorastrap run{holder}",
                                why=f"lock file {path}",
                                fix="Wait for it to finish, or run again without --no-wait to wait for it.")
            narrate(f"waiting for another lorastrap run to release {what}{holder}…")
            start = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if timeout is not None and time.monotonic() - start > timeout:
                        raise BusyError(f"{what} stayed locked for {timeout:.0f} s", why=f"lock file {path}",
                                        fix="Check for a hung lorastrap process.")
                    time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
        return f" (pid {pid})" if pid else ""
    except OSError:
        return ""
