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
import http.client
import os
import re
import shutil
import stat
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorastrap.install import archive
from lorastrap.core import fsutil, locks
from lorastrap.core.errors import DiskError, IntegrityError, NetworkError

CHUNK = 1 << 20
RETRIES = 5  # attempts per archive; a cut or a stall is retried (resuming with Range), a 4xx is not
JOBS = 16  # archives fetched at once, each thread over its own kept-alive connection (rattler/pixi allow 50)
MAX_REDIRECTS = 5


def read_timeout() -> float:
    """Seconds without a byte from the server before a download counts as stalled (LORASTRAP_READ_TIMEOUT)."""
    try:
        return max(0.1, float(os.environ.get("LORASTRAP_READ_TIMEOUT") or 30))
    except ValueError:
        return 30.0


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+: one buffer, read and hashed outside the GIL
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
        return h.hexdigest()


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

    def _verified_marker(self, path: Path) -> Path:
        return path.with_name("." + path.name + ".verified")

    def is_ready(self, sha256: str, filename: str) -> bool:
        """Present, and unchanged since it was verified (size, mtime, ctime and inode as recorded then)."""
        path = self.entry(sha256, filename)
        try:
            return self._verified_marker(path).read_text() == _signature(path)
        except OSError:
            return False

    def fetch(self, url: str, sha256: str, filename: str, *, progress=None, narrate=lambda m: None,
              stop: threading.Event | None = None) -> tuple[Path, int]:
        """The verified archive's path, and how many bytes were downloaded for it (0 when cached).

        A cut or stalled download is retried and resumed (a NetworkError when it never completes); only a complete
        download whose sha256 differs is an IntegrityError.  A partial file is kept (`.FILE.part`, under the
        entry's lock) so that the next run resumes it."""
        path = self.entry(sha256, filename)
        if self.is_ready(sha256, filename):
            return path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(path.parent / ".lock", what=f"cache entry {filename}"):
            if self.is_ready(sha256, filename):  # another installer finished it while we waited
                return path, 0
            tmp = path.with_name(f".{filename}.part")  # kept after a cut: the next run resumes it
            for stale in path.parent.glob(".*.part"):  # other names: killed downloads of older releases
                if stale.name != tmp.name:
                    stale.unlink(missing_ok=True)
            if path.exists():
                got = sha256_file(path)
                if got == sha256:
                    self._mark(path)
                    return path, 0
                path.unlink()
            resumed = tmp.exists() and tmp.stat().st_size > 0
            if resumed and sha256_file(tmp) == sha256:  # a run killed after the last byte: complete, not resumed
                narrate(f"{filename}: a complete earlier download matches the lock; using it")
                got, got_bytes = sha256, 0
            else:
                got_bytes = _download(url, tmp, progress=progress, narrate=narrate, stop=stop,
                                      hosts=self.redirect_hosts)
                got = sha256_file(tmp)
            if got != sha256 and resumed:  # the kept part may be of another file: once more, from the start
                narrate(f"{filename}: the resumed download does not match; downloading it again from the start")
                tmp.unlink()
                got_bytes += _download(url, tmp, progress=progress, narrate=narrate, stop=stop,
                                       hosts=self.redirect_hosts)
                got = sha256_file(tmp)
            if got != sha256:
                tmp.unlink()
                raise IntegrityError(
                    f"{filename}: checksum mismatch (want sha256 {sha256}, got {got})",
                    why=f"the archive at {url} was downloaded completely and is not the one the lock names: "
                        f"altered, corrupted, or a different build on the mirror",
                    fix="Nothing was installed. Check the mirror/channel; if the lock is outdated, re-lock "
                        "with `lorastrap lock`.")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            self._mark(path)
            return path, got_bytes

    def fetch_all(self, items: list[tuple[str, str, str]], *, jobs: int = JOBS, inspect: bool = False,
                  narrate=lambda m: None) -> list[tuple[Path, int]]:
        """fetch() for every (url, sha256, filename), JOBS at a time; the results in the same order.  The first
        failure (or Ctrl-C / SIGTERM) stops the others at their next block and is raised.  inspect: each conda
        archive downloaded is also inspected (the containment check) in its thread while the others download."""
        todo = sum(1 for _, sha, fn in items if not self.is_ready(sha, fn))
        if not todo:
            return [self.fetch(*item) for item in items]
        stop = threading.Event()
        progress = Progress(todo)
        pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, todo)), thread_name_prefix="lorastrap-fetch")
        try:
            futures = [pool.submit(self._fetch_inspected if inspect else self.fetch, url, sha, fn, progress=progress,
                                   narrate=narrate, stop=stop) for url, sha, fn in items]
            results = [f.result() for f in futures]
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
        return results

    def _fetch_inspected(self, url: str, sha256: str, filename: str, **kw) -> tuple[Path, int]:
        path, got = self.fetch(url, sha256, filename, **kw)
        if got and filename.endswith((".conda", ".tar.bz2")):
            self.inspect(path)
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
        fsutil.write_atomic(self._verified_marker(path), _signature(path))

    def check_extracted(self, archives: list[Path], *, full: bool, extracted: Path | None = None,
                        narrate=lambda m: None) -> list[str]:
        """Remove every extracted copy of ARCHIVES (in EXTRACTED: the engine's folder of unpacked packages, by default
        the embedded engine's) whose files differ from their package's paths.json (full: hash every file; else only
        copies whose sizes or mtimes moved since their last full check).  Returns the names of the copies removed
        (the engine unpacks them again from the checked archives)."""
        def check(path: Path) -> str | None:
            folder = (extracted or self.root / "extracted") / _dist_name(path.name)
            if not folder.is_dir():
                return None
            with locks.held(folder.with_name(folder.name + ".lorastrap.lock"), what=f"extracted {folder.name}"):
                entries = self.inspect(path)["entries"]
                bad = _extracted_damage(folder, entries, full=full)
                if bad:
                    narrate(f"the package cache's copy of {folder.name} differs from its package ({bad}): "
                            "unpacking it again")
                    fsutil.remove_tree(folder)
                    return folder.name
            return None

        # One package a thread: a copy whose stats moved is hashed whole, and hashing runs outside the GIL.
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(archives))),
                                thread_name_prefix="lorastrap-check") as pool:
            return [name for name in pool.map(check, archives) if name]

    def restamp_extracted(self, archives: list[Path], *, extracted: Path) -> None:
        """restamp every extracted copy of ARCHIVES that passed check_extracted (see restamp)."""
        for path in archives:
            folder = extracted / _dist_name(path.name)
            if folder.is_dir() and (folder / STAMP).exists():
                with locks.held(folder.with_name(folder.name + ".lorastrap.lock"), what=f"extracted {folder.name}"):
                    restamp(folder, self.inspect(path)["entries"])


def _signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def _dist_name(filename: str) -> str:
    for ext in (".conda", ".tar.bz2"):
        if filename.endswith(ext):
            return filename[: -len(ext)]
    return filename


STAMP = ".lorastrap-checked"  # in an extracted copy: size, mtime and ctime of each file at its last full check
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


def _stats(folder: Path, entries: list[dict]) -> dict[str, str] | str:
    """Size, mtime and ctime of the copy's own info/paths.json and of each file ENTRIES list as a hard link (what
    a stamp records); a string saying what is wrong when one is missing or not a file."""
    stats = {}
    for rel in [OWN_PATHS] + [e["_path"] for e in entries if e.get("path_type", "hardlink") == "hardlink"]:
        p = folder / rel
        try:
            st = p.lstat()
        except OSError:
            return f"{rel} missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{rel} is not a file"
        stats[rel] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    return stats


def restamp(folder: Path, entries: list[dict]) -> None:
    """After an engine linked from a checked copy: record the files' stats as they are now (a new hard link changes
    a file's ctime, not its bytes), so the next quick check does not hash them all again.  The stamp is a hint
    (written without fsync): lost or stale, it only makes the next check a full one."""
    import json
    stats = _stats(folder, entries)
    if isinstance(stats, dict):
        fsutil.write_atomic(folder / STAMP, json.dumps(stats, sort_keys=True), durable=False)


def _extracted_damage(folder: Path, entries: list[dict], *, full: bool) -> str | None:
    """None when the extracted copy matches ENTRIES (the checked archive's own info/paths.json, so a copy unpacked
    from another archive cannot vouch for itself), else the first difference.  Quick (not full): a copy whose
    files (and own info/paths.json) kept the stats its stamp recorded at the last full check passes as it is."""
    import json
    stats = _stats(folder, entries)
    if isinstance(stats, str):
        return stats
    for left in folder.glob(f".{STAMP}.*.tmp"):  # a writer killed mid-write (writes happen under the folder's lock)
        left.unlink(missing_ok=True)
    stamp = folder / STAMP
    if not full:
        try:
            if stamp.read_text() == json.dumps(stats, sort_keys=True):
                return None
        except OSError:
            pass
    bad = _paths_differ(folder, entries)
    if bad:
        return bad
    for e in entries:
        if e["_path"] in stats and e.get("sha256") and sha256_file(folder / e["_path"]) != e["sha256"]:
            return f"{e['_path']} altered"
    fsutil.write_atomic(stamp, json.dumps(stats, sort_keys=True), durable=False)
    return None


class Cancelled(Exception):
    """Another download failed, or the run was interrupted: this one stops at its next block."""


class _HttpStatus(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(f"HTTP {code} {reason}")
        self.code = code


class _Cut(Exception):
    pass


class _Connections(threading.local):
    """Each download thread keeps one keep-alive connection per host (a pool of JOBS connections per host)."""

    def __init__(self) -> None:
        self.by_host: dict[tuple[str, str], http.client.HTTPConnection] = {}


_CONNECTIONS = _Connections()


def _connection(scheme: str, netloc: str, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
    conn = _CONNECTIONS.by_host.get((scheme, netloc))
    if conn is not None:
        conn.timeout = timeout
        return conn, True
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        conn = http.client.HTTPSConnection(netloc, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(netloc, timeout=timeout)
    _CONNECTIONS.by_host[(scheme, netloc)] = conn
    return conn, False


def _drop(scheme: str, netloc: str) -> None:
    conn = _CONNECTIONS.by_host.pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def _proxied(parts: urllib.parse.SplitResult) -> bool:
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")


class _Redirected(Exception):
    """A redirect to a host that is neither the URL's own nor one the user named."""


def _request(url: str, start: int, timeout: float, hosts: frozenset[str] = frozenset()):
    """GET url from byte `start` (a Range request when > 0), following redirects to the same host or to HOSTS only:
    (status, headers, body)."""
    home = (urllib.parse.urlsplit(url).hostname or "").lower()
    headers = {"User-Agent": "lorastrap", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    for _ in range(MAX_REDIRECTS):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _HttpStatus(0, f"unsupported URL scheme {parts.scheme!r}")
        if _proxied(parts):  # through the user's proxy (https_proxy/http_proxy): urllib, one connection a file
            try:
                resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise _HttpStatus(exc.code, str(exc.reason))
            return resp.status, resp.headers, resp
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for fresh in (False, True):  # a pooled connection the server closed meanwhile: once more, on a new one
            conn, reused = _connection(parts.scheme, parts.netloc, timeout)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                _drop(parts.scheme, parts.netloc)
                if fresh or not reused:
                    raise
            except BaseException:
                _drop(parts.scheme, parts.netloc)
                raise
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            resp.read()
            target_url = urllib.parse.urljoin(url, resp.getheader("Location"))
            host = (urllib.parse.urlsplit(target_url).hostname or "").lower()
            if host != home and host not in hosts:
                raise _Redirected(f"{url} redirects to {target_url}, on another host ({host})")
            url = target_url
            continue
        if resp.status >= 400:
            _drop(parts.scheme, parts.netloc)
            raise _HttpStatus(resp.status, resp.reason)
        return resp.status, resp.headers, resp
    raise _HttpStatus(0, f"more than {MAX_REDIRECTS} redirects")


def _copy_local(url: str, dest: Path) -> int:
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


def _download(url: str, dest: Path, *, progress=None, narrate=lambda m: None,
              stop: threading.Event | None = None, hosts: frozenset[str] = frozenset()) -> int:
    """Download url into dest, resuming what dest already holds when the server honours Range.  Returns the
    bytes transferred.  A cut connection, a short body, a read that waits longer than read_timeout() or a 5xx
    is retried (RETRIES attempts, narrated); a 4xx, or running out of attempts, is a NetworkError."""
    if url.startswith("file://") or url.startswith("/"):
        return _copy_local(url, dest)
    host = urllib.parse.urlsplit(url).netloc
    timeout = read_timeout()
    transferred = 0
    last = ""
    for attempt in range(1, RETRIES + 1):
        have = dest.stat().st_size if dest.exists() else 0
        try:
            try:
                status, headers, body = _request(url, have, timeout, hosts)
            except _Redirected as exc:
                raise NetworkError(f"refused a redirect while downloading {url.rsplit('/', 1)[-1]}", why=str(exc),
                                   fix="lorastrap follows redirects only to the same host or to hosts you named "
                                       "(--channel, --mirror, --pip-index-url, or LORASTRAP_REDIRECT_HOSTS=host,…). "
                                       "Nothing was installed.")
            length = int(headers.get("Content-Length") or -1)
            content_range = re.match(r"bytes (\d+)-", headers.get("Content-Range") or "")
            if status == 206 and content_range and int(content_range.group(1)) == have:
                mode, total = "ab", (have + length if length >= 0 else -1)
                if have:
                    narrate(f"{dest.name[1:-5]}: resuming at {have / 2**20:.1f} MiB")
            else:  # the whole file (the server ignored Range, or there was nothing to resume)
                mode, total, have = "wb", length, 0
            with open(dest, mode) as out:
                while True:
                    if stop is not None and stop.is_set():
                        raise Cancelled()
                    block = body.read(CHUNK)
                    if not block:
                        break
                    out.write(block)
                    have += len(block)
                    transferred += len(block)
                    if progress:
                        progress.add(len(block))
            if total >= 0 and have < total:
                raise _Cut(f"the connection closed after {have} of {total} bytes")
            if progress:
                progress.done_one()
            return transferred
        except _HttpStatus as exc:
            last = str(exc)
            if exc.code == 416 and have:  # nothing left to resume from there (a longer or other part): afresh
                narrate(f"{dest.name[1:-5]}: the server cannot resume at {have} bytes; downloading it from the start")
                dest.unlink(missing_ok=True)
                continue
            if exc.code < 500 and exc.code not in (408, 429):
                break
        except (socket.timeout, TimeoutError):
            last = f"no data from {host} for {timeout:.0f} s"
        except (_Cut, http.client.HTTPException, ConnectionError, urllib.error.URLError) as exc:
            last = str(exc) or type(exc).__name__
        except OSError as exc:
            if exc.errno == 28:
                raise DiskError("the package cache's disk is full", fix="Free disk space or set LORASTRAP_HOME.")
            last = str(exc)
        _drop(*urllib.parse.urlsplit(url)[:2])
        if attempt < RETRIES:
            narrate(f"{url.rsplit('/', 1)[-1]}: {last}; retrying ({attempt}/{RETRIES - 1})")
            time.sleep(min(0.25 * 2 ** (attempt - 1), 4))
    raise NetworkError(f"could not download {url}", why=last,
                       fix="Check the network or proxy (https_proxy); rerun to resume what was downloaded; use "
                           "--mirror URL for a reachable mirror, or a bundle/local channel for offline machines.")


class Progress:
    """One progress line on stderr for a parallel fetch, only when stderr is a terminal (never in --json output);
    close() ends the line."""

    def __init__(self, files: int):
        self.files, self.done, self.bytes = files, 0, 0
        self.lock = threading.Lock()
        self.shown = False
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self.last < 0.1):
            return
        self.last = now
        self.shown = True
        print(f"\r  downloading: {self.done}/{self.files} files, {self.bytes / 2**20:7.1f} MiB", end="",
              file=sys.stderr, flush=True)

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self._show()

    def done_one(self) -> None:
        with self.lock:
            self.done += 1
            self._show(force=self.done == self.files)

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)
