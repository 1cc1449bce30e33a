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
lists (fully, or by the stats its stamp recorded at its last full check) and removes a copy that differs, so the
engine unpacks it again from the checked archive; repair always checks fully.  A copy's files pass the quick check
while each keeps its size, mtime and inode, and its ctime too unless its link count moved: each hard link an
install makes, and each one an environment's removal drops, moves the ctime of every file it links, so a stamp of
ctimes alone had every copy hashed whole after any environment was deleted (0.13 s of a warm install of 4,000
files; a real CUDA environment has 10-50x as many).  Each install stamps the copies it linked from anew, right
after linking.  What the quick check misses, then: a write in place that keeps the size and puts the mtime back (or
a file replaced by one of the same size and mtime that got the old inode number back), made after the copy was
last stamped, when its link count has also moved since (an environment made or removed) — by someone who can
write the cache's files, and so the environments' (the same inodes).

The bytes come through download.py, imported only when an archive is missing.
"""

from __future__ import annotations

import hashlib
import functools
import os
import re
import stat
import threading
import urllib.parse
from pathlib import Path

from lorastrap.install import archive
from lorastrap.core import fsutil, locks
from lorastrap.core.credentials import shown
from lorastrap.core.errors import IntegrityError, LorastrapError

HASH_BLOCK = 1 << 20  # what sha256_file reads at a time
JOBS = 16  # archives fetched at once, each thread over its own kept-alive connection (rattler/pixi allow 50)


def sha256_file(path: Path | str) -> str:
    """The file's sha256: read in 1 MiB blocks straight from the descriptor (no buffered reader, no per-call buffer
    to allocate: 4,000 small files, one thread, ~1.3x faster than through hashlib.file_digest), hashed outside the
    GIL."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        block = os.read(fd, HASH_BLOCK)
        h = hashlib.sha256(block)
        while block:
            block = os.read(fd, HASH_BLOCK)
            h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


# Where a named channel host is known to send its files: anaconda.org answers package downloads with a 302 to its
# S3 storage (seen in https://github.com/conda-incubator/ensureconda/pull/25: "302 Found / Location:
# https://binstar-cio-packages-prod.s3.amazonaws.com/…").
STORAGE_OF = {"anaconda.org": {"binstar-cio-packages-prod.s3.amazonaws.com"},
              "conda.anaconda.org": {"binstar-cio-packages-prod.s3.amazonaws.com"}}


def redirect_hosts_from(urls) -> frozenset[str]:
    """The hosts a download may be redirected to besides its own: those of the URLs the user named (channels,
    mirrors, the pip index), the storage those hosts are known to use (STORAGE_OF) and LORASTRAP_REDIRECT_HOSTS
    (comma-separated host names, e.g. a CDN a mirror uses)."""
    named = {urllib.parse.urlsplit(u).hostname for u in urls if u and "://" in u}
    named |= {h for host in list(named) for h in STORAGE_OF.get(host or "", ())}
    named |= {h.strip().lower() for h in os.environ.get("LORASTRAP_REDIRECT_HOSTS", "").split(",") if h.strip()}
    return frozenset(h.lower() for h in named if h)


class Cache:
    def __init__(self, root: Path, redirect_hosts: frozenset[str] = frozenset()):
        self.root = root
        self.archives = root / "archives"
        self.redirect_hosts = redirect_hosts  # besides each URL's own host: see redirect_hosts_from
        self._inspected: dict[Path, tuple[str, dict]] = {}  # path → (signature, inspect's answer)

    def entry(self, sha256: str, filename: str) -> Path:
        return self.archives / sha256 / filename

    def is_ready(self, sha256: str, filename: str) -> bool:
        """Present, and unchanged since it was verified (size, mtime, ctime and inode as recorded then)."""
        path = self.entry(sha256, filename)
        try:
            return verified_signature(path) == _signature(path)
        except OSError:
            return False

    def fetch(self, url: str, sha256: str, filename: str, *, progress=None, narrate=lambda m: None,
              stop: threading.Event | None = None) -> tuple[Path, int]:
        """The verified archive's path, and how many bytes were downloaded for it (0 when cached).

        A cut or stalled download is retried and resumed (a NetworkError when it never completes); only a complete
        download whose sha256 differs is an IntegrityError.  A partial file is kept (`.FILE.part`, under the
        entry's lock; written in segments, with the sidecar `.FILE.part.segments` saying which bytes it holds) so
        that the next run resumes it.  The sidecar is a hint written without fsync: a part it describes wrongly
        ends in a sha256 mismatch, and the archive is downloaded again from the start."""
        path = self.entry(sha256, filename)
        if self.is_ready(sha256, filename):
            return path, 0
        from lorastrap.install import download  # the transport: only when an archive is missing
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(path.parent / ".lock", what=f"cache entry {filename}"):
            if self.is_ready(sha256, filename):  # another installer finished it while we waited
                return path, 0
            tmp = path.with_name(f".{filename}.part")  # kept after a cut: the next run resumes it
            for stale in path.parent.glob(".*.part*"):  # other names: killed downloads of older releases
                if _PART.fullmatch(stale.name) and stale.name not in (tmp.name, download.sidecar(tmp).name):
                    stale.unlink(missing_ok=True)
            if path.exists():
                got = sha256_file(path)
                if got == sha256:
                    self._mark(path)
                    return path, 0
                path.unlink()
            resumed = tmp.exists() and tmp.stat().st_size > 0
            kept = download.kept_segments(tmp)  # a part whose sidecar lists segments still to fetch is not complete
            whole = kept is None or all(s.finished for s in kept[1])
            if resumed and whole and sha256_file(tmp) == sha256:  # a run killed after the last byte: complete
                narrate(f"{filename}: a complete earlier download matches the lock; using it")
                got, got_bytes = sha256, 0
            else:
                got_bytes, got = download.into(url, tmp, progress=progress, narrate=narrate, stop=stop,
                                               hosts=self.redirect_hosts)
                got = got or sha256_file(tmp)  # taken while it came, or now
            if got != sha256 and resumed:  # the kept part may be of another file: once more, from the start
                narrate(f"{filename}: the resumed download does not match; downloading it again from the start")
                download.discard(tmp)
                more, got = download.into(url, tmp, progress=progress, narrate=narrate, stop=stop,
                                          hosts=self.redirect_hosts)
                got_bytes += more
                got = got or sha256_file(tmp)
            if got != sha256:
                download.discard(tmp)
                raise IntegrityError(
                    f"{filename}: checksum mismatch (want sha256 {sha256}, got {got})",
                    why=f"the archive at {shown(url)} was downloaded completely and is not the one the lock names: "
                        f"altered, corrupted, or a different build on the mirror",
                    fix="Nothing was installed. Check the mirror/channel; if the lock is outdated, re-lock "
                        "with `lorastrap lock`.")
            download.sidecar(tmp).unlink(missing_ok=True)  # before the rename: a part left complete is used as it is
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            self._mark(path)
            return path, got_bytes

    def fetch_all(self, items: list[tuple[str, str, str]], *, jobs: int = JOBS, inspect: bool = False,
                  on_ready=None, narrate=lambda m: None) -> list[tuple[Path, int]]:
        """fetch() for every (url, sha256, filename), JOBS at a time; the results in the same order.  The first
        failure (or Ctrl-C / SIGTERM) stops the others at their next block and is raised.  inspect: each conda
        archive downloaded is also inspected (the containment check) in its thread while the others download, and
        then given to ON_READY(path, sha256) there."""
        todo = sum(1 for _, sha, fn in items if not self.is_ready(sha, fn))
        if not todo:
            return [self.fetch(*item) for item in items]
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
        from lorastrap.install.download import Cancelled, Progress, Stop
        stop = Stop()  # set: every download's connections are shut down too, so none waits on a silent server
        progress = Progress(todo)
        pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, todo)), thread_name_prefix="lorastrap-fetch")
        try:
            job = functools.partial(self._fetch_inspected, on_ready=on_ready) if inspect else self.fetch
            futures = [pool.submit(job, url, sha, fn, progress=progress, narrate=narrate, stop=stop)
                       for url, sha, fn in items]
            wait(futures, return_when=FIRST_EXCEPTION)  # a failure of any item, not only of the first ones
            failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failed:
                stop.set()
                wait(futures)
                failed = [f.exception() for f in futures if f.exception() is not None]
                raise next((e for e in failed if not isinstance(e, Cancelled)), failed[0])
            results = [f.result() for f in futures]
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
        return results

    def _fetch_inspected(self, url: str, sha256: str, filename: str, *, on_ready=None, **kw) -> tuple[Path, int]:
        path, got = self.fetch(url, sha256, filename, **kw)
        if got and filename.endswith((".conda", ".tar.bz2")):
            self.inspect(path)
            if on_ready is not None:
                on_ready(path, sha256)
        return path, got

    def inspect(self, path: Path) -> dict:
        """archive.inspect of a checked entry (its info/paths.json entries included), remembered beside it (keyed
        by the entry's signature, so an entry changed since is inspected again) and in this process."""
        import json
        sig = _signature(path)
        kept = self._inspected.get(path)
        if kept and kept[0] == sig:
            return kept[1]
        marker = path.with_name("." + path.name + ".inspected")
        try:
            kept = json.loads(marker.read_text())
            if kept.get("signature") == sig and kept.get("version") == INSPECTED_VERSION:
                self._inspected[path] = (sig, kept["info"])
                return kept["info"]
        except (OSError, ValueError, AttributeError, KeyError):
            pass
        info = archive.inspect(path)
        fsutil.write_atomic(marker, json.dumps({"signature": sig, "version": INSPECTED_VERSION, "info": info}),
                            durable=False)
        self._inspected[path] = (sig, info)
        return info

    def _mark(self, path: Path) -> None:
        fsutil.write_atomic(_verified_marker(path), _signature(path))

    def check_extracted(self, archives: list[Path], *, full: bool, extracted: Path | None = None,
                        entries: dict[Path, list] | None = None, narrate=lambda m: None) -> list[str]:
        """Remove every extracted copy of ARCHIVES (in EXTRACTED: the engine's folder of unpacked packages, by default
        the embedded engine's) whose files differ from their package's paths.json (full: hash every file; else only
        copies whose files' stats moved since their stamp: _stamped) — ENTRIES[archive] when given (what was
        inspected when the archive was checked), else the archive's as it is now.  Returns the names of the copies
        removed (the engine unpacks them again from the checked archives), sorted."""
        def check(path: Path, quick: bool = False) -> str | None:
            """None when the copy passes (QUICK: by its stamp alone; a copy that does not is left for a full
            check: "full"), else the name of the copy removed."""
            folder = (extracted or self.root / "extracted") / dist_name(path.name)
            if not folder.is_dir():
                return None
            with locks.held(folder.with_name(folder.name + ".lorastrap.lock"), what=f"extracted {folder.name}"):
                listed = entries[path] if entries is not None else self.inspect(path)["entries"]
                if quick:
                    return None if _stamped(folder, listed) else "full"
                bad = _extracted_damage(folder, listed)
                if bad:
                    narrate(f"the package cache's copy of {folder.name} differs from its package ({bad}): "
                            "unpacking it again")
                    fsutil.remove_tree(folder)
                    return folder.name
            return None

        # The quick check first, in this thread: stats and their stamp (threads only queued for the GIL between
        # short lstat calls: the large set's 4,000 files took 30-40 ms in two threads, 20 ms in one).
        if not full:
            archives = [path for path in archives if check(path, quick=True) == "full"]
        # Then a few threads, each with a share of the packages balanced by archive size, each share checked in
        # turn: a copy is hashed whole, outside the GIL.  (A future a package, or a file, made two threads slower
        # than one: the threads queued for the GIL between short hashes.)
        if not archives:
            return []
        sizes = {path: _size(path) + 1 for path in archives}
        shares: list[list[Path]] = [[] for _ in range(max(1, min(4, os.cpu_count() or 1, len(archives))))]
        loads = [0] * len(shares)
        for path in sorted(sizes, key=sizes.get, reverse=True):
            i = loads.index(min(loads))
            shares[i].append(path)
            loads[i] += sizes[path]
        from concurrent.futures import ThreadPoolExecutor  # here: a warm install's quick check needs no threads
        with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="lorastrap-check") as pool:
            done = pool.map(lambda share: [name for name in map(check, share) if name], shares)
            return sorted(name for names in done for name in names)

    def restamp_extracted(self, archives: list[Path], *, extracted: Path, fresh: frozenset = frozenset()) -> None:
        """restamp every extracted copy of ARCHIVES that passed check_extracted (see restamp), and the FRESH ones:
        the copies the embedded engine's worker unpacked in this run from the checked archive (the sha256 it
        computed of the bytes it unpacked was the lock's), named by dist_name."""
        for path in archives:
            folder = extracted / dist_name(path.name)
            if folder.is_dir() and ((folder / STAMP).exists() or folder.name in fresh):
                with locks.held(folder.with_name(folder.name + ".lorastrap.lock"), what=f"extracted {folder.name}"):
                    restamp(folder, self.inspect(path)["entries"])


_PART = re.compile(r"\..+\.part(\.segments(\.\d+\.tmp)?)?")  # a part, its sidecar, a sidecar being written


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _signature(path: Path) -> str:
    return signature(path.stat())


def signature(st: os.stat_result) -> str:
    """What an entry's .verified marker records of its stats when its sha256 matched (see the module's docstring)."""
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def verified_signature(path: Path) -> str | None:
    """The stats the entry at PATH had when its sha256 matched the lock's (its .verified marker); None when it has
    no marker."""
    try:
        return _verified_marker(path).read_text()
    except OSError:
        return None


def _verified_marker(path: Path) -> Path:
    return path.with_name("." + path.name + ".verified")


def dist_name(filename: str) -> str:
    """An archive's NAME-VERSION-BUILD: the name of its unpacked copy."""
    for ext in (".conda", ".tar.bz2"):
        if filename.endswith(ext):
            return filename[: -len(ext)]
    return filename


STAMP = ".lorastrap-checked"  # in an extracted copy: each file's stats at its last check (_stats)
INSPECTED_VERSION = 2  # the layout of an archive's .inspected marker (an older one is inspected again)
OWN_PATHS = "info/paths.json"


def _paths_key(entries) -> set:
    return {(e.get("_path"), e.get("path_type", "hardlink"), e.get("sha256")) for e in entries if isinstance(e, dict)}


def _paths_differ(folder: Path, entries: list[dict]) -> str | None:
    """The engine links what the copy's own info/paths.json lists: it must list what the archive's does, no more."""
    import json
    try:
        own = json.loads((folder / OWN_PATHS).read_text()).get("paths", [])
    except (OSError, ValueError, AttributeError):
        return "its info/paths.json is missing or unreadable"
    if _paths_key(own) != _paths_key(entries):
        extra = sorted(str(p) for p, _, _ in _paths_key(own) - _paths_key(entries))
        return "its info/paths.json differs from the archive's" + (f" (it adds {extra[0]})" if extra else "")
    return None


def _stats(folder: Path, entries: list[dict]) -> dict[str, list] | str:
    """[size, mtime, inode, ctime, link count] of the copy's own info/paths.json and of each file ENTRIES list as a
    hard link (what a stamp records); a string saying what is wrong when one is missing or not a file."""
    stats = {}
    base = f"{folder}/"
    for rel in [OWN_PATHS] + [e["_path"] for e in entries if e.get("path_type", "hardlink") == "hardlink"]:
        try:
            st = os.lstat(base + rel)
        except OSError:
            return f"{rel} missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{rel} is not a file"
        stats[rel] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_nlink]
    return stats


def _unmoved(stamped: dict, stats: dict[str, list]) -> bool:
    """Whether each file kept the stats STAMPED recorded: size, mtime and inode, and its ctime unless its link count
    moved (a hard link made or dropped moves the ctime, not the bytes)."""
    if type(stamped) is not dict or stamped.keys() != stats.keys():
        return False
    for rel, now in stats.items():
        then = stamped[rel]
        if then != now and not (type(then) is list and len(then) == 5 and then[:3] == now[:3] and then[4] != now[4]):
            return False  # not the same size, mtime and inode with another link count
    return True


STAMP_MOST = 64 << 20  # a stamp larger than this is no stamp of lorastrap's (4,000 files: ~0.4 MiB)


def _read_stamp(stamp: Path) -> dict | None:
    """The stamp's record of each file's stats; None when there is none or it cannot be one (unreadable, not a
    regular file, too large, not JSON): the check is then a full one."""
    import json
    try:
        return json.loads(fsutil.read_bounded(stamp, limit=STAMP_MOST, what="the stamp", fix=""))
    except (LorastrapError, ValueError, RecursionError):
        return None


def restamp(folder: Path, entries: list[dict]) -> None:
    """After an engine linked from a checked copy: record the files' stats as they are now (a new hard link moves a
    file's link count and ctime, not its bytes), so the next quick check does not hash them all again.  The stamp is a hint
    (written without fsync): lost or stale, it only makes the next check a full one."""
    import json
    stats = _stats(folder, entries)
    if isinstance(stats, dict):
        fsutil.write_atomic(folder / STAMP, json.dumps(stats, sort_keys=True), durable=False)


def _stamped(folder: Path, entries: list[dict]) -> bool:
    """The quick check: whether the copy's files (and own info/paths.json) kept the stats its stamp recorded
    (_unmoved).  Not stamped anew when it passes: the install that checked it stamps it right after linking from
    it (restamp), when the link counts moved again."""
    stats = _stats(folder, entries)
    if isinstance(stats, str):
        return False
    stamped = _read_stamp(folder / STAMP)
    return stamped is not None and _unmoved(stamped, stats)


def _extracted_damage(folder: Path, entries: list[dict]) -> str | None:
    """None when the extracted copy matches ENTRIES (the checked archive's own info/paths.json, so a copy unpacked
    from another archive cannot vouch for itself: each file hashed), else the first difference; a copy that
    matches is stamped (its files' stats, for the quick check: _stamped)."""
    import json
    stats = _stats(folder, entries)
    if isinstance(stats, str):
        return stats
    for left in folder.glob(f".{STAMP}.*.tmp"):  # a writer killed mid-write (writes happen under the folder's lock)
        left.unlink(missing_ok=True)
    stamp = folder / STAMP
    bad = _paths_differ(folder, entries)
    if bad:
        return bad
    base = f"{folder}/"
    for e in entries:
        if e["_path"] in stats and e.get("sha256") and sha256_file(base + e["_path"]) != e["sha256"]:
            return f"{e['_path']} altered"
    fsutil.write_atomic(stamp, json.dumps(stats, sort_keys=True), durable=False)
    return None
