"""Files written so that a crash leaves the old content or the new one, never half of either."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import time
from pathlib import Path

FICLONE = 0x40049409  # Linux ioctl: share the source's blocks copy-on-write (btrfs, XFS, bcachefs, OCFS2)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside PATH, fsync, rename over PATH, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a folder: renamed out of the way first, so a crash never leaves a half-removed one at PATH."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    trash = path.with_name(f"{path.name}.lorastrap-trash-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def unshare_tree(root: Path) -> tuple[int, int]:
    """Give every hard-linked regular file under ROOT its own inode (a reflink where the filesystem has them, else
    a copy), so an edit inside ROOT reaches nothing outside it.  Returns (files, of which reflinked)."""
    files = reflinked = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                continue
            tmp = f"{path}.lorastrap-copy"
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                try:
                    fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                    reflinked += 1
                except OSError:
                    shutil.copyfileobj(src, dst, 1 << 20)
            shutil.copystat(path, tmp)
            os.replace(tmp, path)
            files += 1
    return files, reflinked


def on_path(name: str) -> str | None:
    """shutil.which, skipping pyenv/asdf-style shim folders (a shim is not the program)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "shims" not in Path(d).parts]
    return shutil.which(name, path=os.pathsep.join(dirs))
