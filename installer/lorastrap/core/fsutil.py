"""Files written so that a crash leaves the old content or the new one, never half of either."""

from __future__ import annotations

import contextlib
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


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write to a temporary name beside PATH, fsync, rename over PATH, fsync the folder.  durable=False: no fsync —
    for a hint that may be lost or left stale by a power cut without harm (a cache marker that, when it does not
    match, only makes the next run check again): readers see the old text or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
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
    rmtree_quietly(trash)


def rmtree_quietly(path) -> None:
    """shutil.rmtree, errors ignored — a folder deeper than the interpreter's recursion limit too (shutil.rmtree
    recurses once a level on Python 3.11 and raises RecursionError whatever ignore_errors says): then removed
    level by level without recursion, as far as paths reach (PATH_MAX)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        todo: list[tuple[str, bool]] = [(os.fspath(path), False)]
        while todo:
            folder, emptied = todo.pop()
            if emptied:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
                continue
            todo.append((folder, True))
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append((entry.path, False))
                else:
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass


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


def cwd_removed() -> bool:
    """The current folder was removed meanwhile (os.getcwd() fails there: a user still in an environment's folder
    after removing it)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


@contextlib.contextmanager
def sound_cwd():
    """Run the block from / when the current folder was removed (cwd_removed), and give that folder back after, by
    descriptor — so a relative path still means what it meant (nothing: nothing can be made there).  For an import
    that asks for the current folder: py-rattler 0.28's ChannelConfig takes os.getcwd() as a default argument,
    evaluated when `rattler` is imported."""
    if not cwd_removed():
        yield
        return
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir("/")
        yield
    finally:
        os.fchdir(here)
        os.close(here)


def on_path(name: str) -> str | None:
    """shutil.which, skipping pyenv/asdf-style shim folders (a shim is not the program)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "shims" not in Path(d).parts]
    return shutil.which(name, path=os.pathsep.join(dirs))
def read_bounded(path: Path, *, limit: int, what: str, fix: str) -> str:
    """The text of a regular file no larger than LIMIT bytes.  A FIFO, a device (/dev/zero) or a folder is refused
    before anything is read (a read could block forever or never end), as is a larger file."""
    import stat as _stat

    from lorastrap.core.errors import UsageError
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read", why=exc.strerror or str(exc), fix=fix)
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            kind = ("a folder" if _stat.S_ISDIR(st.st_mode) else "a FIFO" if _stat.S_ISFIFO(st.st_mode)
                    else "a device or socket")
            raise UsageError(f"{what} {path} is {kind}, not a file", why="only regular files are read (a pipe or "
                             "device could block or never end)", fix=fix)
        if st.st_size > limit:
            raise UsageError(f"{what} {path} is {st.st_size} bytes, more than {limit}",
                             why=f"files of this kind are far smaller; at most {limit} bytes are read", fix=fix)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UsageError(f"{what} {path} grew past {limit} bytes while being read", why="it is being written",
                             fix=fix)
        return data.decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def read_stream_tail(stream, *, keep: int, limit: int, what: str, fix: str) -> str:
    """Read a text stream (stdin) to its end, keeping its last KEEP characters; more than LIMIT characters in all
    (an endless source such as /dev/zero) is refused."""
    from lorastrap.core.errors import UsageError
    tail, total = "", 0
    while True:
        block = stream.read(1 << 20)
        if not block:
            return tail
        total += len(block)
        if total > limit:
            raise UsageError(f"{what}: more than {limit} characters", why="the input does not end (or is not a log)",
                             fix=fix)
        tail = (tail + block)[-keep:]


def hostname() -> str:
    """This node's name as gethostname(2) gives it (uname's nodename), without importing socket (~2 ms)."""
    return os.uname().nodename


def owner_tag() -> str:
    """Names a temporary folder after its owner: HOST.PID (a cache shared over NFS holds other hosts' folders)."""
    return f"{hostname()}.{os.getpid()}"


def _dead(host: str, pid: int) -> bool:
    if host != hostname():
        return False  # another node's: never judged from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_orphans(folder: Path, prefix: str, *, marked: bool = False) -> list[Path]:
    """Remove FOLDER's PREFIX<HOST>.<PID>.* entries whose owner (on this host) is dead: what a SIGKILLed run left.
    marked: PREFIX is a marker inside the name, after a part of its own (.<NAME>.partial.<HOST>.<PID>.d).  Returns
    what was removed."""
    import re as _re
    removed = []
    try:
        names = [p for p in folder.iterdir() if (prefix in p.name if marked else p.name.startswith(prefix))]
    except OSError:
        return removed
    for p in names:
        head = p.name.split(prefix)[0] + prefix if marked else prefix
        m = _re.fullmatch(_re.escape(head) + r"(.+)\.(\d+)\.[^/]*", p.name)
        if m and _dead(m.group(1), int(m.group(2))):
            if p.is_dir() and not p.is_symlink():
                rmtree_quietly(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def read_pipe_bounded(path: Path, *, limit: int, what: str, fix: str, timeout: float = 60.0) -> str:
    """The text a pipe or FIFO at PATH carries (`<(git show …)`), to its end, at most LIMIT bytes.  Opened without
    blocking: a FIFO nobody writes to reads as empty, and a writer that goes silent for TIMEOUT seconds is refused
    rather than waited for."""
    import select

    from lorastrap.core.errors import UsageError
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read", why=exc.strerror or str(exc), fix=fix)
    chunks, total = [], 0
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise UsageError(f"{what} {path}: nothing came through the pipe for {timeout:.0f} s",
                                 why="its writer is stuck or never ends", fix=fix)
            try:
                block = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if not block:
                return b"".join(chunks).decode("utf-8", errors="replace")
            total += len(block)
            if total > limit:
                raise UsageError(f"{what} {path}: more than {limit} bytes", why="the input does not end", fix=fix)
            chunks.append(block)
    finally:
        os.close(fd)
