"""The transport: one file over HTTP(S) (or a local copy) into a `.part` file, resumed, retried, in segments.

http.client with a kept-alive connection per host and thread (measured against urllib3 on loopback: as fast on
small files, faster on big ones), proxies through urllib (https_proxy, no_proxy), redirects only to the URL's own
host or hosts the user named, HTTP Basic credentials from the URL (its own host only) or .netrc.

A large archive from a server that honours Range, over a connection that brings it slowly, is downloaded in
segments, several byte ranges at once, each over its own connection (a link that caps each connection's bandwidth
is then bounded by the archive's share of the link, not by one connection); a sidecar beside its `.part` records
what each segment wrote, for the next run.  Its sha256 is taken while it comes (see _Follower).
A part kept for the next run is resumed with If-Range (its file's ETag, else Last-Modified, kept in that sidecar):
a file the server changed meanwhile comes whole in the same answer, never spliced onto the old one's bytes.
Imported only when something is downloaded: a warm install never pays for http.client and ssl.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from lorastrap.core import credentials, fsutil
from lorastrap.core.credentials import shown
from lorastrap.core.errors import DiskError, NetworkError

CHUNK = 1 << 20
RETRIES = 5  # attempts per archive (per segment); a cut or a stall is retried (resuming with Range), a 4xx is not
MAX_REDIRECTS = 5
SEGMENTS = 8  # a large archive that comes slowly comes over up to this many connections at once
PIECES = 32  # ... cut into up to this many segments, taken in order: its bytes without a gap grow steadily
SEGMENT_MIN = 1 << 20  # the least a segment holds (a file is split when at least twice this remains)
SPLIT_BELOW = 128 * 2**20  # bytes a second: one connection that brings less than this is joined by others
PACE_EVERY = 0.1  # seconds over which a connection's pace is taken (see _Job._pace)
HASH_BLOCK = 1 << 20  # what the sha256 of a part written in segments reads at a time, while they come (_Follower)
EXTRA_CONNECTIONS = 16  # the connections segments add, in the whole process (beyond each fetch thread's own)
SIDECAR_EVERY = 0.5  # seconds between writes of a segmented part's sidecar (its progress, for the next run)
FULL = (errno.ENOSPC, errno.EDQUOT)  # a disk that is full, or a quota used up (a shared filesystem's usual limit)


def read_timeout() -> float:
    """Seconds without a byte from the server before a download counts as stalled (LORASTRAP_READ_TIMEOUT)."""
    try:
        return max(0.1, float(os.environ.get("LORASTRAP_READ_TIMEOUT") or 30))
    except ValueError:
        return 30.0


class Cancelled(Exception):
    """Another download failed, or the run was interrupted: this one stops at its next block."""


class Stop(threading.Event):
    """The stop of several downloads at once (fetch_all's).  Set, it also runs what the downloads hooked on it: each
    shuts down the connections it reads from, so that a read waiting on a silent server ends now, not at its read
    timeout (a Ctrl-C, or another archive's failure, would otherwise wait for it up to LORASTRAP_READ_TIMEOUT)."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list = []
        self._hooks_lock = threading.Lock()

    def hook(self, fn) -> None:
        with self._hooks_lock:
            self._hooks.append(fn)
            now = self.is_set()
        if now:
            fn()

    def unhook(self, fn) -> None:
        with self._hooks_lock:
            if fn in self._hooks:
                self._hooks.remove(fn)

    def set(self) -> None:
        super().set()
        with self._hooks_lock:
            hooks = list(self._hooks)
        for fn in hooks:
            fn()


def _shut(sock) -> None:
    """End every read and write on SOCK, whichever thread waits in one (socket.socket's own shutdown, also for a TLS
    socket: its reader then sees an error, not a torn-down TLS object)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass


class _HttpStatus(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(f"HTTP {code} {reason}")
        self.code = code


class _Cut(Exception):
    pass


class _Tracking(threading.local):
    """The track function of the request this thread makes now (see _request): a connection's socket is handed to
    it as soon as it exists, so a stop also ends a connect's proxy tunnel, TLS handshake or wait for headers."""

    def __init__(self) -> None:
        self.fn = None


_TRACKING = _Tracking()


def _tracked(sock) -> None:
    if _TRACKING.fn is not None:
        _TRACKING.fn(sock)


def _create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
    """socket.create_connection's, with each socket tracked before it connects: a stop also ends a connect that a
    host dropping packets (a firewall, a full accept queue) would leave waiting for the timeout, and a proxy's tunnel
    or a TLS handshake after it."""
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _name, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        _tracked(sock)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(where)
            return sock
        except OSError as exc:
            last = exc
            sock.close()
    raise last or OSError(f"no address for {host}")


class _HTTP(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _HTTPS(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection

    def connect(self) -> None:
        """http.client's, with the TLS socket tracked before its handshake (a silent server would hold it until the
        read timeout)."""
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host,
                                              do_handshake_on_connect=False)
        _tracked(self.sock)
        self.sock.do_handshake()


class _TrackedHTTPHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_HTTP, req, **kwargs)


class _TrackedHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_HTTPS, req, **kwargs)


class _Connections(threading.local):
    """Each download thread keeps one keep-alive connection per host (a pool of JOBS connections per host)."""

    def __init__(self) -> None:
        self.by_host: dict[tuple[str, str], http.client.HTTPConnection] = {}


_CONNECTIONS = _Connections()


def _connection(scheme: str, netloc: str, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
    netloc = netloc.rsplit("@", 1)[-1]  # a pool per host and port, whatever user:password a URL names
    conn = _CONNECTIONS.by_host.get((scheme, netloc))
    if conn is not None:
        conn.timeout = timeout
        return conn, True
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        conn = _HTTPS(netloc, timeout=timeout, context=ctx)
    else:
        conn = _HTTP(netloc, timeout=timeout)
    _CONNECTIONS.by_host[(scheme, netloc)] = conn
    return conn, False


def _drop(scheme: str, netloc: str) -> None:
    conn = _CONNECTIONS.by_host.pop((scheme, netloc.rsplit("@", 1)[-1]), None)
    if conn is not None:
        conn.close()


def _proxied(parts: urllib.parse.SplitResult) -> bool:
    return parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")


class _Redirected(Exception):
    """A redirect to a host that is neither the URL's own nor one the user named."""


_EXTRA = threading.BoundedSemaphore(EXTRA_CONNECTIONS)  # one a helper segment, while it works
_HELPERS: ThreadPoolExecutor | None = None
_HELPERS_LOCK = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """The threads that fetch segments besides each file's first connection (each keeps its own connections)."""
    global _HELPERS
    with _HELPERS_LOCK:
        if _HELPERS is None:
            _HELPERS = ThreadPoolExecutor(max_workers=EXTRA_CONNECTIONS, thread_name_prefix="lorastrap-segment")
        return _HELPERS


def _request(url: str, first: int | None, last: int | None, timeout: float, hosts: frozenset[str] = frozenset(),
             if_range: str | None = None, track=lambda sock: None):
    """GET url's bytes FIRST..LAST (a Range request; no Range header when FIRST is None, to the end when LAST is
    None), following redirects to the same host or to HOSTS only: (status, headers, body, the URL that answered).
    IF_RANGE (an ETag or a date the file had): the range only while the file is still that one, else the whole
    file (200), as RFC 9110 13.1.5 says.  Credentials: the URL's user:password (sent to its own host only) or the
    host's .netrc entry, as HTTP Basic.  TRACK gets every socket the request opens, as soon as it is connected."""
    _TRACKING.fn = track
    try:
        return _requested(url, first, last, timeout, hosts, if_range, track)
    finally:
        _TRACKING.fn = None


def _requested(url, first, last, timeout, hosts, if_range, track):
    home = (urllib.parse.urlsplit(url).hostname or "").lower()
    own_netloc = urllib.parse.urlsplit(url).netloc
    secure = urllib.parse.urlsplit(url).scheme == "https"
    headers = {"User-Agent": "lorastrap", "Accept-Encoding": "identity"}
    if first is not None:
        headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        if if_range:
            headers["If-Range"] = if_range
    for _ in range(MAX_REDIRECTS):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _HttpStatus(0, f"unsupported URL scheme {parts.scheme!r}")
        netloc = parts.netloc.rsplit("@", 1)[-1]  # without user:password
        sent = dict(headers)
        # Credentials never go out unencrypted after an https URL redirected to http (requests strips them too).
        auth = None if secure and parts.scheme != "https" else credentials.authorization(
            parts, own=parts.netloc == own_netloc)
        if _proxied(parts):  # through the user's proxy (https_proxy/http_proxy): urllib, one connection a file
            req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)), headers=sent)
            if auth:
                req.add_unredirected_header("Authorization", auth)
            try:
                resp = _proxy_opener().open(req, timeout=timeout)  # its sockets tracked as they connect
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.headers else None
                exc.close()
                if exc.code in (301, 302, 303, 307, 308) and location:
                    url = _redirected(url, location, home, hosts)
                    continue
                raise _HttpStatus(exc.code, str(exc.reason))
            return resp.status, resp.headers, resp, url
        if auth:
            sent["Authorization"] = auth
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for fresh in (False, True):  # a pooled connection the server closed meanwhile: once more, on a new one
            conn, reused = _connection(parts.scheme, netloc, timeout)
            if conn.sock is not None:  # a pooled connection, opened (and tracked) for an earlier download
                track(conn.sock)
            try:
                conn.request("GET", target, headers=sent)
                resp = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                _drop(parts.scheme, netloc)
                if fresh or not reused:
                    raise
            except BaseException:
                _drop(parts.scheme, netloc)
                raise
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            resp.read()
            url = _redirected(url, resp.getheader("Location"), home, hosts)
            continue
        if resp.status >= 400:
            _drop(parts.scheme, netloc)
            raise _HttpStatus(resp.status, resp.reason)
        return resp.status, resp.headers, resp, url
    raise _HttpStatus(0, f"more than {MAX_REDIRECTS} redirects")


def _redirected(url: str, location: str, home: str, hosts: frozenset[str]) -> str:
    """Where a redirect from URL to LOCATION leads, when it stays on URL's host (HOME) or goes to one of HOSTS."""
    target = urllib.parse.urljoin(url, location)
    host = (urllib.parse.urlsplit(target).hostname or "").lower()
    if host != home and host not in hosts:
        raise _Redirected(f"{shown(url)} redirects to {shown(target)}, on another host ({host})")
    return target


class _Unfollowed(urllib.request.HTTPRedirectHandler):
    """Through a proxy too, lorastrap decides which redirects to follow (_redirected): urllib answers each as an
    HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER: list = []


def _proxy_opener():
    if not _OPENER:
        # with the environment's proxies, as urlopen's; its connections tracked as the pooled ones are
        _OPENER.append(urllib.request.build_opener(_Unfollowed, _TrackedHTTPHandler, _TrackedHTTPSHandler))
    return _OPENER[0]


def _extent(status: int, headers) -> tuple[int, int]:
    """Where a response's body starts in the file, and the file's size (-1: not said)."""
    try:
        length = max(-1, int(headers.get("Content-Length") or -1))
    except ValueError:  # no length (http.client then reads the answer to its connection's end)
        length = -1
    if status != 206:
        return 0, length
    # At most 18 digits (an exabyte): a longer number fits no file (os.ftruncate raised OverflowError, int() of
    # more than 4,300 digits ValueError); such an answer says nothing usable.
    m = re.match(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}(?![0-9])|\*)", headers.get("Content-Range") or "")
    if not m:
        return -1, -1
    return int(m.group(1)), int(m.group(3)) if m.group(3) != "*" else -1


def _copy_local(url: str, dest: Path) -> int:
    src = Path(urllib.request.url2pathname(url[7:])) if url.startswith("file://") else Path(url)
    try:
        shutil.copyfile(src, dest)
    except FileNotFoundError:
        raise NetworkError(f"{src} does not exist", why="the lock names a local file that is not there",
                           fix="Point --channel/--mirror at the folder that holds the packages.")
    except OSError as exc:
        if exc.errno in FULL:
            raise DiskError(f"the package cache's disk is full while copying {src.name} ({exc.strerror})",
                            fix="Free disk space or set LORASTRAP_HOME to a larger disk.")
        raise
    return dest.stat().st_size


def into(url: str, dest: Path, *, progress=None, narrate=lambda m: None,
         stop: threading.Event | None = None, hosts: frozenset[str] = frozenset()) -> tuple[int, str | None]:
    """Download url into dest, resuming what dest already holds when the server honours Range (a contiguous
    start, or the segments its sidecar records).  A large file from a server that honours Range comes as several
    byte ranges at once, each over its own connection (see _Job).  Returns the bytes transferred, and the sha256 of
    dest as it ends when it was taken while the bytes came (see _Follower; else None: the caller hashes dest).
    A cut connection, a short body, a read that waits longer than read_timeout() or a 5xx is retried (RETRIES
    attempts for each range, narrated); a 4xx, or running out of attempts, is a NetworkError."""
    if url.startswith("file://") or url.startswith("/"):
        return _copy_local(url, dest), None
    job = _Job(url, dest, progress=progress, narrate=narrate, stop=stop, hosts=hosts)
    return job.run(), job.sha256


class _Segment:
    """Bytes start..end (exclusive; None: to the end of an answer of unknown size) of the file, `done` of them
    written; `taken` once a connection works on it."""

    def __init__(self, start: int, end: int | None, done: int = 0):
        self.start, self.end, self.done, self.taken = start, end, done, False
        self.writing = 0  # where the block being written ends (0: none), under the job's lock: no cut lies below
        self.cut = False  # ended by a split that shut its connection down (see _Job._split)

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def finished(self) -> bool:
        return self.end is not None and self.pos >= self.end


def sidecar(part: Path) -> Path:
    """Beside a `.part` written in segments: its size and each segment's start, end and bytes written."""
    return part.with_name(part.name + ".segments")


def _sidecar_doc(part: Path) -> dict | None:
    """What a `.part`'s sidecar holds: the validator of the file the part is of (`validator`: its ETag or
    Last-Modified, to resume it with If-Range), and for a part written in segments `total` and `segments`."""
    import json
    try:
        doc = json.loads(sidecar(part).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _validator_of(doc: dict | None) -> str | None:
    """The sidecar's validator, when it is one _validators could have kept (printable ASCII: a header can carry it;
    anything else, e.g. a sidecar edited or damaged, made http.client raise UnicodeEncodeError at every run)."""
    v = doc.get("validator") if doc else None
    return v if isinstance(v, str) and v and _sendable(v) else None


def _validators(headers) -> tuple[str | None, str | None]:
    """What may identify this version of the file, for If-Range: its strong ETag (a weak one may not be used there:
    RFC 9110 13.1.5) and its Last-Modified date; None for either that is missing or could not be sent back."""
    etag = (headers.get("ETag") or "").strip()
    date = (headers.get("Last-Modified") or "").strip()
    return (etag if etag and not etag.startswith("W/") and _sendable(etag) else None,
            date if date and _sendable(date) else None)


def _sendable(value: str) -> bool:
    return len(value) <= 200 and value.isascii() and value.isprintable()


def kept_segments(part: Path) -> tuple[int, list[_Segment]] | None:
    """The size and segments a `.part`'s sidecar records, when it describes that part: segments that cover the
    file from its first byte to its last, in order, of the part's size; else None."""
    doc = _sidecar_doc(part)
    try:
        total = int(doc["total"])
        segments = [_Segment(int(s), int(e), int(d)) for s, e, d in doc["segments"]]
        size = part.stat().st_size
    except (OSError, ValueError, TypeError, KeyError, OverflowError):  # OverflowError: json reads Infinity, 1e999
        return None
    at = 0
    for seg in segments:
        if seg.start != at or seg.end <= seg.start or not 0 <= seg.done <= seg.end - seg.start:
            return None
        at = seg.end
    return (total, segments) if segments and at == total == size else None


def discard(part: Path) -> None:
    """Remove a `.part` and then its sidecar (so a part with holes never outlives the sidecar that says where)."""
    part.unlink(missing_ok=True)
    sidecar(part).unlink(missing_ok=True)


def _read(body, n: int) -> bytes:
    """Up to N bytes of an answer, as soon as some came (a stop or a failure elsewhere is seen at once, whatever
    the link's speed); an answer read to its end is closed, so its connection can carry the next request."""
    block = body.read1(n)
    if getattr(body, "length", None) == 0:
        body.read()
    return block


class _Whole(Exception):
    """A server that honours `bytes=N-` answered a helper's closed range (`bytes=N-M`) with the whole file: the
    helper gives its segment back, and the first connection fetches it."""


class _Afresh(Exception):
    """The first request must be made again: what the part holds cannot be resumed (removed: the next attempt
    starts from the first byte), or the server refused If-Range (the next attempt asks without it)."""


class _Job:
    """One archive's download into its `.part` file.  The first request (`Range: bytes=N-`, N being where the part
    stops) tells whether the server honours ranges and the file's size.  When it does, at least 2 × SEGMENT_MIN
    remain, and that connection brings less than SPLIT_BELOW bytes a second (taken every PACE_EVERY seconds, for
    as long as it reads: a server that slows a connection down after a burst, or a stall, counts), what it has not
    read yet is cut into up to PIECES segments, recorded in a sidecar beside the part (preallocated to the file's
    size): the first connection reads on (and into the next segment while no other connection took it), helpers —
    at most SEGMENTS - 1 a file, each over its own pooled connection, at most EXTRA_CONNECTIONS in the process, none
    when none is free — take the first segment no one took, with closed ranges, one after the other; each writes
    at its offsets with os.pwrite and retries its own segment from where it stopped.  The first failure stops the
    others.  A connection that keeps up stays alone: over loopback from a server on the same two cores, eight
    connections a file made a cold install of two 320 MiB archives ~0.3 s slower (5 alternating pairs: 2.47 s
    against 2.16 s), the server's work for them ~1.6x.  Taken in order, the segments leave the part written
    without a gap up to a point that moves on steadily, behind which its sha256 is taken while the rest comes
    (_Follower): hashed after its last byte, a 320 MiB archive waited ~0.25 s more for its check."""

    def __init__(self, url: str, dest: Path, *, progress, narrate, stop, hosts):
        self.url = self.final = url  # final: the URL the first request landed on (segments ask it)
        self.dest, self.progress, self.narrate, self.stop, self.hosts = dest, progress, narrate, stop, hosts
        self.name = dest.name[1:-5]
        self.timeout = read_timeout()
        self.may_split = SEGMENTS > 1 and not _proxied(urllib.parse.urlsplit(url))
        self.segments: list[_Segment] = []
        self.total = -1
        self.split = False  # the segments are recorded in the sidecar
        self.splittable = False  # the first connection may be joined by others, if it is slow (_pace)
        self.paced = (0.0, 0)  # when the first connection's pace was last taken, and the bytes transferred then
        self.generation = 0  # the part was started over from its first byte this many times (see _Follower)
        self.fd: int | None = None
        self.validator: str | None = None  # the file's ETag or Last-Modified (see _seen)
        self.etags: set[str | None] = set()  # the ETags, and Last-Modified dates, the file's answers carried
        self.dates: set[str | None] = set()
        self.if_range = True  # False once the server refused a request for carrying If-Range
        self.transferred = 0
        self.lock, self.save_lock = threading.Lock(), threading.Lock()
        self.saved = 0.0
        self.halt = threading.Event()  # a segment failed: the others stop at their next block
        self.errors: list[BaseException] = []
        self.helpers: list = []
        self.waiting = 0  # helpers started that have not taken a segment yet
        self.running = 0  # helpers started that have not ended
        self.follower: _Follower | None = None  # the part's sha256, taken while its segments come
        self.sha256: str | None = None  # ... once the last byte came
        self.helped = True  # False once the server answered a helper's closed range with the whole file
        self.permits = _EXTRA
        self.socks: list = []  # the sockets this download reads from (see Stop)
        self.first_thread = 0  # the thread of the first connection, and the socket it reads now (see _split)
        self.first_sock = None
        self.first_waits = False  # the first connection waits to try again: its pace is not taken meanwhile
        self.ending = False  # the download is ending: no helper starts any more

    def run(self) -> int:
        self.first_thread = threading.get_ident()
        if isinstance(self.stop, Stop):
            self.stop.hook(self._shut_all)
        try:
            return self._run()
        finally:
            if isinstance(self.stop, Stop):
                self.stop.unhook(self._shut_all)

    def _track(self, sock) -> None:
        if sock is None:
            return
        with self.lock:
            self.socks.append(sock)
            if threading.get_ident() == self.first_thread:
                self.first_sock = sock
        if self._stopped():
            _shut(sock)

    def _shut_all(self) -> None:
        with self.lock:
            socks = list(self.socks)
        for sock in socks:
            _shut(sock)

    def _run(self) -> int:
        try:
            opened = self._opening()
            if opened is None:  # every byte is written (or there is none to write): the sha256 check decides
                if self.progress:
                    self.progress.done_one()
                return 0
            try:
                if self.total >= 2 * SEGMENT_MIN:
                    self.follower = _Follower(self)
                self._spawn()
                seg, body, attempt = opened
                while seg is not None:
                    self._work(seg, body, attempt, first=True)
                    self._join()  # a helper may have given its segment back (see _Whole)
                    seg, body, attempt = None if self.halt.is_set() else self._take(), None, 1
            except BaseException as exc:
                self._failed(exc)
            finally:
                with self.lock:
                    self.splittable, self.ending = False, True  # no split, no helper from here on
                self._join()
        finally:
            if self.follower is not None:
                self.sha256 = self.follower.end(whole=not self.errors and all(s.finished for s in self.segments))
            self._close()
        real = [e for e in self.errors if not isinstance(e, Cancelled)]
        if real or self.errors:
            raise (real or self.errors)[0]
        if self.progress:
            self.progress.done_one()
        return self.transferred

    # --- the first request: what the server answers decides the segments -------------------------------------

    def _opening(self) -> tuple[_Segment, object, int] | None:
        """The first request, retried: (the segment its answer starts, the answer, the attempt it took)."""
        attempt = 1
        while True:
            try:
                opened = self._open()
                return opened if opened is None else (*opened, attempt)
            except _Afresh:
                pass
            except _Redirected as exc:
                raise NetworkError(f"refused a redirect while downloading {self.url.rsplit('/', 1)[-1]}",
                                   why=str(exc),
                                   fix="lorastrap follows redirects only to the same host or to hosts you named "
                                       "(--channel, --mirror, --pip-index-url, or LORASTRAP_REDIRECT_HOSTS=host,…). "
                                       "Nothing was installed.")
            except (_HttpStatus, _Cut, http.client.HTTPException, OSError) as exc:
                self._retry(attempt, self._failure(exc), self.name)
            attempt += 1
            if attempt > RETRIES:
                self._give_up("the part kept could not be resumed")

    def _open(self) -> tuple[_Segment, object] | None:
        doc, kept = _sidecar_doc(self.dest), kept_segments(self.dest)
        if kept is None and sidecar(self.dest).exists() and (doc is None or "segments" in doc):
            discard(self.dest)  # a sidecar that does not describe the part: holes
            doc = None
        if kept:
            todo = [s for s in kept[1] if not s.finished]
            if not todo:
                self.segments = kept[1]
                return None
            start = todo[0].pos
        else:
            start = self.dest.stat().st_size if self.dest.exists() else 0
        kept_of = _validator_of(doc) if start and self.if_range else None  # resumed only while the file is that one
        self.etags, self.dates = set(), set()
        try:
            status, headers, body, self.final = _request(self.url, start if start or self.may_split else None, None,
                                                         self.timeout, self.hosts, if_range=kept_of,
                                                         track=self._track)
        except _HttpStatus as exc:
            if exc.code == 416 and start:  # nothing left to resume from there (a longer or other part): afresh
                self.narrate(f"{self.name}: the server cannot resume at {start} bytes; downloading it from the start")
                discard(self.dest)
                raise _Afresh()
            if kept_of and exc.code in (400, 412):  # a server that refuses If-Range (RFC 9110: ignore it) — else
                self.narrate(f"{self.name}: the server refuses If-Range (HTTP {exc.code}); resuming without it")
                self.if_range = False  # every run would be refused, the entry wedged: the sha256 decides, as before
                raise _Afresh()
            raise
        at, total = _extent(status, headers)
        if status == 206 and at != start:
            self._hang_up(body)
            raise _Cut(f"the server answered from byte {at}, not {start}")
        if status == 206 and kept_of:  # the part's file, by the validator an earlier run settled on
            etag, date = _validators(headers)
            if kept_of != etag:  # that run's ETags differed (it kept the date), or this one names another
                self.etags.add(None if kept_of == date else kept_of)
        self._seen(headers)
        if kept:
            if status != 206 or total != kept[0]:
                self._hang_up(body)
                self.narrate(f"{self.name}: the kept part is not of the file the server has now; downloading it "
                             "from the start")
                discard(self.dest)
                raise _Afresh()
            self.total, self.segments, self.split = kept[0], kept[1], True
            self._open_part()
            self.narrate(f"{self.name}: resuming at {sum(s.done for s in self.segments) / 2**20:.1f} of "
                         f"{self.total / 2**20:.1f} MiB ({len(todo)} segments to finish)")
        else:
            have = start if status == 206 else 0
            if have:
                self.narrate(f"{self.name}: resuming at {have / 2**20:.1f} MiB")
            elif start and kept_of:
                self.narrate(f"{self.name}: the file changed on the server since the part was kept; downloading it "
                             "from the start")
            self.total = total
            self._open_part(truncate=status != 206)
            self.segments = [_Segment(0, total if total >= 0 else None, have)]
            self.splittable = self.may_split and status == 206 and total - have >= 2 * SEGMENT_MIN \
                and not _proxied(urllib.parse.urlsplit(self.final))
            self.paced = (time.monotonic(), self.transferred)
        first = next((s for s in self.segments if not s.finished), None)
        if first is None:  # the answer holds nothing the part lacks (an empty file, or a total where it stops)
            self._hang_up(body)
            return None
        first.taken = True
        return first, body

    def _pace(self) -> None:
        """Every PACE_EVERY seconds while the first connection reads alone (from its thread after each block, and
        from the follower's while it waits): fewer than SPLIT_BELOW bytes a second since the last time, and what it
        has not read yet is split."""
        now = time.monotonic()
        with self.lock:
            if not self.splittable or self.split or self.first_waits or now - self.paced[0] < PACE_EVERY:
                return
            slow = self.transferred - self.paced[1] < SPLIT_BELOW * (now - self.paced[0])
            self.paced = (now, self.transferred)
        if slow:
            self._split()

    def _split(self) -> None:
        """Cut what the first connection has not written yet into segments (see the class), and helpers start.
        Called from the first connection's own thread (between two reads), it reads on through the first of them.
        Called from the follower's, while that connection may wait in a read that will not end before the read
        timeout (a stall, from any point of the last pace), it keeps only the block it is writing, if any: a block
        it reads past the cut is not written (_fill), and when the cut leaves it nothing its socket is shut down (its
        thread goes on with a segment no one took).  All under the lock, the part's descriptor included: the
        follower's thread may call this as the download ends (which makes it unsplittable under the lock first)."""
        reader = threading.get_ident() == self.first_thread
        with self.lock:
            first = self.segments[-1]
            at = max(first.pos, first.writing)  # never below a block being written
            if not self.splittable or self.split or self.halt.is_set() or first.end is None \
                    or first.end - at < 2 * SEGMENT_MIN:
                return
            n = min(PIECES, (first.end - at) // SEGMENT_MIN)
            cuts = [at + (first.end - at) * i // n for i in range(n + 1)]
            if reader:
                cuts = cuts[1:]
            first.end = cuts[0]
            self.segments += [_Segment(a, b) for a, b in zip(cuts, cuts[1:])]
            self.split = True
            self._write(self._doc())  # the sidecar before the holes
            os.ftruncate(self.fd, self.total)
            first.cut = not reader and first.finished and self.first_sock is not None
            if first.cut:
                _shut(self.first_sock)
        self._spawn()

    def _open_part(self, truncate: bool = False) -> None:
        if self.fd is not None:  # an earlier attempt's (its part may have been discarded since)
            os.close(self.fd)
        self.fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT, 0o644)
        if truncate:
            os.ftruncate(self.fd, 0)

    # --- the segments -------------------------------------------------------------------------------------------

    def _work(self, seg: _Segment, body, attempt: int = 1, *, first: bool = False) -> None:
        """Fetch SEG, then the first segment no one took, and so on (the first connection reads on into the next
        one while no helper took it), each with RETRIES attempts from where it stopped."""
        while seg is not None:
            try:
                if body is None:
                    if seg.finished:  # cut short by a split while this connection waited to try again
                        seg = self._take()
                        continue
                    body = self._ranged(seg, open_ended=first)
                goes_on = self._fill(seg, body)
                attempt = 1
                nxt = self._take(after=seg.end) if first and goes_on and not body.isclosed() else None
                if nxt is None:
                    if not body.isclosed():  # the answer goes on past what this connection still needs
                        self._hang_up(body)
                    body = None
                    nxt = self._take()
                seg = nxt
                self._spawn()
            except _Whole:
                with self.lock:
                    seg.taken, told, self.helped = False, self.helped, False
                if told:
                    self.narrate(f"{self.name}: the server answers a closed range with the whole file; the first "
                                 "connection fetches the rest")
                return
            except (_HttpStatus, _Cut, http.client.HTTPException, OSError) as exc:
                body = None
                if seg.finished:  # its connection was shut down by a split that left it nothing (see _split)
                    _drop(*urllib.parse.urlsplit(self.final)[:2])
                    seg, attempt = self._take(), 1
                    continue
                self._retry(attempt, self._failure(exc), self._label(seg))
                attempt += 1

    def _ranged(self, seg: _Segment, *, open_ended: bool):
        """Ask for what SEG still lacks; a server that now answers the whole file starts an unsplit download over."""
        try:
            status, headers, body, _ = _request(self.final, seg.pos if seg.pos or self.may_split else None,
                                                None if open_ended or seg.end is None else seg.end - 1,
                                                self.timeout, self.hosts, track=self._track)
        except _Redirected as exc:
            raise _HttpStatus(0, str(exc))
        at, total = _extent(status, headers)
        if status == 206 and at == seg.pos and (total < 0 or self.total < 0 or total == self.total):
            if seg.done:
                self.narrate(f"{self._label(seg)}: resuming at {seg.pos / 2**20:.1f} MiB")
            self._seen(headers)
            return body
        if status == 200:
            with self.lock:  # decided under the split's own lock: split meanwhile, helpers may be writing
                single = not self.split
                if single:
                    seg.done, seg.end, self.total = 0, (total if total >= 0 else None), total
                    self.splittable = False  # ... and from now on no split
                    self.generation += 1  # before the bytes the follower may have hashed go
                    self.etags, self.dates = set(), set()  # the file from its first byte: what this answer says
            if single:
                os.ftruncate(self.fd, 0)
                self._seen(headers)
                return body
        self._hang_up(body)
        if status == 200 and not open_ended:
            raise _Whole()
        raise _Cut(f"the server did not answer with bytes {seg.pos}- (HTTP {status})")

    def _seen(self, headers) -> None:
        """An answer's validators.  The part is kept with the file's ETag while every answer carried the same one,
        else with its Last-Modified date while that was the same (load-balanced backends each give the same file
        an ETag of their own, from its inode: an If-Range on one of them would never match, and every run would
        start the part over), else with none (resumed as before If-Range: its sha256 decides)."""
        etag, date = _validators(headers)
        with self.lock:
            self.etags.add(etag)
            self.dates.add(date)
            one = lambda seen: next(iter(seen)) if len(seen) == 1 else None  # noqa: E731
            self.validator = one(self.etags) or one(self.dates)

    def _fill(self, seg: _Segment, body) -> bool:
        """Write the answer BODY into SEG until SEG is whole.  True when the answer may go on into the segment after
        SEG (it stands at SEG's end); False when it cannot: it ended, or the segment was cut short while a block was
        read (see _split: the bytes past the cut are another segment's, and not written here)."""
        while not seg.finished:
            if (self.stop is not None and self.stop.is_set()) or self.halt.is_set():
                raise Cancelled()
            block = _read(body, CHUNK if seg.end is None else min(CHUNK, seg.end - seg.pos))
            if not block:
                if seg.end is None:  # an answer of unknown size ends where its body ends
                    seg.end = seg.pos
                if seg.end is not None and not seg.finished:
                    raise _Cut(f"the connection closed after {seg.pos if not self.split else seg.done} of "
                               f"{seg.end if not self.split else seg.end - seg.start} bytes")
                return False
            at = seg.pos
            with self.lock:
                room = len(block) if seg.end is None else min(len(block), seg.end - at)
                seg.writing = at + room
            view = memoryview(block)[:room]
            while view:
                view = view[os.pwrite(self.fd, view, at + room - len(view)):]
            self._advance(seg, room)
            if room < len(block):
                return False
            if self.splittable:
                self._pace()
        return not seg.cut

    def _advance(self, seg: _Segment, n: int) -> None:
        with self.lock:
            seg.done += n
            seg.writing = 0
            self.transferred += n
        if self.follower is not None:
            self.follower.moved.set()
        if self.progress:
            self.progress.add(n)
        if self.split and time.monotonic() - self.saved >= SIDECAR_EVERY:
            self._save(every=SIDECAR_EVERY)

    def _save(self, every: float = 0.0) -> None:
        """The sidecar: the segments' progress as it is now (written atomically; no fsync — see fetch), unless it
        was written less than EVERY seconds ago."""
        with self.save_lock:
            if every and time.monotonic() - self.saved < every:
                return
            with self.lock:
                doc = self._doc()
            self._write(doc)

    def _write(self, doc: dict) -> None:
        import json
        self.saved = time.monotonic()
        fsutil.write_atomic(sidecar(self.dest), json.dumps(doc), durable=False)

    def _doc(self) -> dict:  # under self.lock
        return {"total": self.total, "segments": [[s.start, s.end, s.done] for s in self.segments],
                "validator": self.validator}

    def _take(self, *, after: int | None = None) -> _Segment | None:
        """The segment that starts at AFTER, when no one took it; else (AFTER None) the first one no one took."""
        with self.lock:
            free = [s for s in self.segments if not s.taken and not s.finished]
            if after is not None:
                free = [s for s in free if s.pos == after]
            if not free:
                return None
            free[0].taken = True
            return free[0]

    def _spawn(self) -> None:
        """A helper for each segment no one took, as far as SEGMENTS connections a file and the process's extra
        connections allow."""
        while not self.halt.is_set() and self.helped:
            with self.lock:
                if sum(not s.taken and not s.finished for s in self.segments) <= self.waiting \
                        or self.running >= SEGMENTS - 1:
                    return
            if not self.permits.acquire(blocking=False):
                return
            with self.lock:  # with _run's `ending` under the same lock: every helper started is joined
                if self.ending:
                    self.permits.release()
                    return
                self.waiting += 1
                self.running += 1
                self.helpers.append(_helpers().submit(self._helper))

    def _helper(self) -> None:
        try:
            with self.lock:
                self.waiting -= 1
            seg = self._take()
            if seg is not None:
                self._work(seg, None)
        except BaseException as exc:
            self._failed(exc)
        finally:
            with self.lock:
                self.running -= 1
            self.permits.release()

    def _failed(self, exc: BaseException) -> None:
        _drop(*urllib.parse.urlsplit(self.final)[:2])  # this thread's connection may hold an answer half read
        with self.lock:
            self.errors.append(exc)
        self.halt.set()
        self._shut_all()  # the other segments' reads end now (their threads see the halt and stop)

    def _join(self) -> None:
        while True:
            with self.lock:
                pending = [f for f in self.helpers if not f.done()]
            if not pending:
                return
            wait(pending)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            if not self.split:  # one contiguous part: what it is of, for the next run's If-Range, when unfinished
                if self.validator and self.transferred and not all(s.finished for s in self.segments):
                    import json
                    fsutil.write_atomic(sidecar(self.dest), json.dumps({"validator": self.validator}), durable=False)
                return
            if all(s.finished for s in self.segments):
                sidecar(self.dest).unlink(missing_ok=True)  # the part is whole: contiguous from now on
            else:
                self._save()  # the next run resumes from here
        except OSError:
            pass

    # --- failures ---------------------------------------------------------------------------------------------

    def _label(self, seg: _Segment) -> str:
        if not self.split:
            return self.name
        return f"{self.name} (segment {self.segments.index(seg) + 1}/{len(self.segments)})"

    def _hang_up(self, body) -> None:
        """Close the connection an answer not read to its end came on (it cannot carry another request)."""
        body.close()
        _drop(*urllib.parse.urlsplit(self.final)[:2])

    def _failure(self, exc: BaseException) -> str:
        """What went wrong, for the narration; raises at once what another attempt cannot mend."""
        if isinstance(exc, _HttpStatus):
            if exc.code < 500 and exc.code not in (408, 429):
                self._give_up(str(exc))
            return str(exc)
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return f"no data from {urllib.parse.urlsplit(self.final).netloc.rsplit('@', 1)[-1]} for {self.timeout:.0f} s"
        if isinstance(exc, OSError) and exc.errno in FULL:
            raise DiskError(f"the package cache's disk is full ({exc.strerror})",
                            fix="Free disk space or set LORASTRAP_HOME.")
        return str(exc) or type(exc).__name__

    def _retry(self, attempt: int, last: str, label: str) -> None:
        """After a failed attempt: narrated, then a pause before the next; a NetworkError after the last."""
        for u in {self.url, self.final}:
            _drop(*urllib.parse.urlsplit(u)[:2])
        if self._stopped():  # the failure of a stop (another archive failed, Ctrl-C): nothing to retry nor tell
            raise Cancelled()
        if attempt >= RETRIES:
            self._give_up(last)
        self.narrate(f"{label}: {last}; retrying ({attempt}/{RETRIES - 1})")
        until = time.monotonic() + min(0.25 * 2 ** (attempt - 1), 4)
        first = threading.get_ident() == self.first_thread
        if first:
            with self.lock:
                self.first_waits = True  # a pause, not a slow connection
        try:
            while not self._stopped() and time.monotonic() < until:  # a stop is seen during the pause, not after it
                self.halt.wait(min(0.05, max(0.0, until - time.monotonic())))
        finally:
            if first:
                with self.lock:
                    self.first_waits, self.paced = False, (time.monotonic(), self.transferred)
        if self._stopped():
            raise Cancelled()

    def _stopped(self) -> bool:
        return self.halt.is_set() or (self.stop is not None and self.stop.is_set())

    def _give_up(self, last: str):
        host = urllib.parse.urlsplit(self.final).hostname
        if last.startswith(("HTTP 401", "HTTP 403")):
            raise NetworkError(f"could not download {shown(self.url)}", why=f"{last}: {host} wants credentials",
                               fix=f"Give them in ~/.netrc (or the file $NETRC names): `machine {host} login USER "
                                   f"password PASSWORD`, or in the URL (https://USER:PASSWORD@{host}/…, e.g. with "
                                   "--mirror); lorastrap sends them to that host only.")
        raise NetworkError(f"could not download {shown(self.url)}", why=last,
                           fix="Check the network or proxy (https_proxy); rerun to resume what was downloaded; use "
                               "--mirror URL for a reachable mirror, or a bundle/local channel for offline machines.")


class _Follower:
    """The sha256 of a part (of 2 × SEGMENT_MIN or more), taken while its bytes come: a thread reads the part from
    its first byte on, as far as it is written without a gap, and hashes it (outside the GIL); what is left when
    the last byte came is hashed then (end).  It reads the part on disk, as the check after the download did: a
    byte below that point is written again only when the part starts over from its first byte (an answer of the
    whole file before any split, see _ranged: the hash starts over too, by the job's generation); a segment's retry
    resumes where it stopped; the bytes a killed run kept are the part's like the others.  The same thread takes
    the first connection's pace while it waits (_Job._pace): a stalled connection brings no block that would."""

    def __init__(self, job: _Job):
        self.job = job
        self.hash = hashlib.sha256()
        self.at = 0  # bytes hashed
        self.generation = job.generation  # the part's, when they were
        self.moved = threading.Event()  # a segment wrote more, or the download ended
        self.ended = False
        self.failed = False
        self.thread = threading.Thread(target=self._follow, name="lorastrap-hash", daemon=True)
        self.thread.start()

    def _edge(self) -> int:
        """Where the bytes written without a gap from the first one end (the hash starts over when the part did)."""
        edge = 0
        with self.job.lock:
            if self.job.generation != self.generation:
                self.hash, self.at, self.generation = hashlib.sha256(), 0, self.job.generation
            for seg in self.job.segments:  # in order, each starting where the one before ends
                edge = seg.pos
                if not seg.finished:
                    break
        return edge

    def _same(self) -> bool:
        with self.job.lock:
            return self.job.generation == self.generation

    def _follow(self) -> None:
        try:
            fd = os.open(self.job.dest, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.failed = True
            return
        try:
            buf = bytearray(HASH_BLOCK)
            view = memoryview(buf)
            while True:
                self.moved.wait(PACE_EVERY if self.job.splittable else None)
                self.moved.clear()
                self.job._pace()  # a connection that stalls brings no block that would take its pace
                ended, edge = self.ended, self._edge()
                least = 1 if ended else HASH_BLOCK  # whole blocks while the bytes come: fewer wake-ups and reads
                while edge - self.at >= least and not self.failed:
                    n = os.preadv(fd, [view[:min(len(buf), edge - self.at)]], self.at)
                    if not self._same():  # started over while this was read: those bytes may be the new ones
                        break
                    if n <= 0:
                        raise OSError(f"the part ends at {self.at} bytes")
                    self.hash.update(view[:n])
                    self.at += n
                if ended or self.failed:
                    return
        except OSError:
            self.failed = True
        finally:
            os.close(fd)

    def end(self, *, whole: bool) -> str | None:
        """The part's sha256 once its thread hashed every byte (WHOLE: the download ended with every segment
        written); None when it did not end so (the thread just stops)."""
        self.failed = self.failed or not whole
        self.ended = True
        self.moved.set()
        self.thread.join()
        if self.failed or self.at != self.job.total:
            return None
        return self.hash.hexdigest()


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
