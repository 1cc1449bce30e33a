"""The package cache: every archive a lock names, downloaded once and checked against the lock's sha256.

Entries are content-addressed (``archives/<sha256>/<filename>``), written to a temporary name in the same folder
and renamed into place only after their hash matched: an entry either is complete and verified or is absent.
Several installers (one node, or many nodes on a shared filesystem) may fill one cache at once; each archive is
fetched under its own lock, and an entry another installer finished is used as is.  py-rattler does not check
hashes of file:// URLs — this module checks every archive, whatever its URL, before an engine sees it.

An entry counts as verified while its size, mtime, ctime and inode are those recorded when its sha256 matched.
The ctime is what a same-size swap with its mtime put back cannot fake (any write or utime sets it to "now");
otherwise the archive is hashed again.

The engine unpacks archives into ``extracted/<name>-<version>-<build>/`` and hard-links environments to those
files (what conda and micromamba do by default).  So an edit made in place inside an environment is an edit of the
extracted copy too.  ``check_extracted`` compares an extracted copy with the sha256 the checked archive's ``info/paths.json``
lists (fully, or by the size and mtime recorded at its last full check) and removes a copy that differs, so the
engine unpacks it again from the checked archive; repair always checks fully.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lorastrap import archive, fsutil, locks
from lorastrap.errors import DiskError, IntegrityError, NetworkError

CHUNK = 1 << 20
RETRIES = 3


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


class Cache:
    def __init__(self, root: Path):
        self.root = root
        self.archives = root / "archives"

    def entry(self, sha256: str, filename: str) -> Path:
        return self.archives / sha256 / filename

    def _verified_marker(self, path: Path) -> Path:
        return path.with_name("." + path.name + ".verified")

    def is_ready(self, sha256: str, filename: str) -> bool:
        """Present, and unchanged since it was verified (size, mtime, ctime and inode as recorded then)."""
        path = self.entry(sha256, filename)
        try:
            return self._verified_marker(path).read_text() == _signature(path)
        except OSError:
            return False

    def fetch(self, url: str, sha256: str, filename: str, *, progress=None) -> tuple[Path, int]:
        """The verified archive's path, and how many bytes were downloaded for it (0 when cached)."""
        path = self.entry(sha256, filename)
        if self.is_ready(sha256, filename):
            return path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(path.parent / ".lock", what=f"cache entry {filename}"):
            if self.is_ready(sha256, filename):  # another installer finished it while we waited
                return path, 0
            for stale in path.parent.glob(".*.part"):  # a killed download's; only the lock's holder writes here
                stale.unlink(missing_ok=True)
            if path.exists():
                got = sha256_file(path)
                if got == sha256:
                    self._mark(path)
                    return path, 0
                path.unlink()
            tmp = path.with_name(f".{filename}.{os.getpid()}.part")
            try:
                size = _download(url, tmp, progress=progress)
                got = sha256_file(tmp)
                if got != sha256:
                    raise IntegrityError(
                        f"{filename}: checksum mismatch (want sha256 {sha256}, got {got})",
                        why=f"the archive at {url} is not the one the lock names: altered, corrupted, or a "
                            f"different build on the mirror",
                        fix="Nothing was installed. Check the mirror/channel; if the lock is outdated, re-lock "
                            "with `lorastrap lock`.")
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
                self._mark(path)
                return path, size
            finally:
                if tmp.exists():
                    tmp.unlink()

    def _mark(self, path: Path) -> None:
        fsutil.write_atomic(self._verified_marker(path), _signature(path))

    def check_extracted(self, archives: list[Path], *, full: bool, narrate=lambda m: None) -> list[str]:
        """Remove every extracted copy of ARCHIVES whose files differ from their package's paths.json (full: hash
        every file; else only copies whose sizes or mtimes moved since their last full check).  Returns the names
        of the copies removed (the engine unpacks them again from the checked archives)."""
        removed = []
        for path in archives:
            folder = self.root / "extracted" / _dist_name(path.name)
            if not folder.is_dir():
                continue
            with locks.held(folder.with_name(folder.name + ".lorastrap.lock"), what=f"extracted {folder.name}"):
                bad = _extracted_damage(folder, archive.paths_json(path).get("paths", []), full=full)
                if bad:
                    narrate(f"the package cache's copy of {folder.name} differs from its package ({bad}): "
                            "unpacking it again")
                    fsutil.remove_tree(folder)
                    removed.append(folder.name)
        return removed


def _signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def _dist_name(filename: str) -> str:
    for ext in (".conda", ".tar.bz2"):
        if filename.endswith(ext):
            return filename[: -len(ext)]
    return filename


STAMP = ".lorastrap-checked"  # in an extracted copy: the size and mtime of each file at its last full check


def _extracted_damage(folder: Path, entries: list[dict], *, full: bool) -> str | None:
    """None when the extracted copy matches ENTRIES (the checked archive's own info/paths.json, so a copy unpacked
    from another archive cannot vouch for itself), else the first difference."""
    import json
    stats = {}
    for e in entries:
        if e.get("path_type", "hardlink") != "hardlink":
            continue
        p = folder / e["_path"]
        try:
            st = p.lstat()
        except OSError:
            return f"{e['_path']} missing"
        if not p.is_file() or p.is_symlink():
            return f"{e['_path']} is not a file"
        stats[e["_path"]] = f"{st.st_size}:{st.st_mtime_ns}"
    stamp = folder / STAMP
    if not full:
        try:
            if stamp.read_text() == json.dumps(stats, sort_keys=True):
                return None
        except OSError:
            pass
    for e in entries:
        if e["_path"] in stats and e.get("sha256") and sha256_file(folder / e["_path"]) != e["sha256"]:
            return f"{e['_path']} altered"
    fsutil.write_atomic(stamp, json.dumps(stats, sort_keys=True))
    return None


def _download(url: str, dest: Path, *, progress=None) -> int:
    if url.startswith("file://") or url.startswith("/"):
        src = Path(urllib.request.url2pathname(url[7:])) if url.startswith("file://") else Path(url)
        try:
            shutil.copyfile(src, dest)
        except FileNotFoundError:
            raise NetworkError(f"{src} does not exist", why="the lock names a local file that is not there",
                               fix="Point --channel/--mirror at the folder that holds the packages.")
        except OSError as exc:
            if exc.errno == 28:
                raise DiskError(f"the package cache's disk is full while copying {src.name}",
                                fix="Free disk space or set LORASTRAP_HOME to a larger disk.")
            raise
        return dest.stat().st_size
    last: Exception | None = None
    for attempt in range(RETRIES):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "lorastrap"})
            with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            return done
        except urllib.error.HTTPError as exc:
            last = exc
            if exc.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = exc
        except OSError as exc:
            if exc.errno == 28:
                raise DiskError("the package cache's disk is full", fix="Free disk space or set LORASTRAP_HOME.")
            last = exc
        time.sleep(0.5 * (attempt + 1))
    reason = getattr(last, "reason", None) or last
    raise NetworkError(f"could not download {url}", why=str(reason),
                       fix="Check the network or proxy (https_proxy); use --mirror URL for a reachable mirror, "
                           "or a bundle/local channel for offline machines.")


def progress_printer(label: str):
    """A download progress line on stderr, only when stderr is a terminal (never in --json output)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        pct = f"{100 * done // total:3d}%" if total else ""
        print(f"\r  {label} {done / 2**20:7.1f} MiB {pct}", end="", file=sys.stderr, flush=True)
    return show
