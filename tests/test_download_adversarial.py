"""The segmented downloader against servers that lie, disks that fill, runs that are stopped, and parts that others
touch: every probe ends in the right bytes or in a clear NetworkError / IntegrityError / DiskError, with the
extra-connection permits given back and nothing written beside the part."""

import errno
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from netsim import NetSim
from test_download import SIX, _fetch_six, _leftovers, one_connection, six  # noqa: F401  (fixtures)

from lorastrap.install import cache, download
from lorastrap.core.errors import DiskError, IntegrityError, NetworkError


@pytest.fixture(autouse=True)
def permits(monkeypatch):
    """A fresh process-wide bound for each probe; every permit must be back when the download ended, however."""
    sem = threading.BoundedSemaphore(download.EXTRA_CONNECTIONS)
    monkeypatch.setattr(download, "_EXTRA", sem)
    yield sem
    assert sem._value == download.EXTRA_CONNECTIONS, "a helper kept its extra connection"
    helpers = [t for t in threading.enumerate() if t.name.startswith("lorastrap-segment")]
    assert len(helpers) <= download.EXTRA_CONNECTIONS
    assert download._HELPERS is None or download._HELPERS._work_queue.empty()  # no helper left queued


def _only_expected(pkgs, sha, name="six.conda"):
    """Nothing but the entry's own files (its lock, the archive and its marker, or the part and its sidecar)."""
    allowed = {".lock", name, f".{name}.verified", f".{name}.part", f".{name}.part.segments"}
    found = {p.name for p in (pkgs / "archives" / sha).iterdir()}
    assert found <= allowed, found - allowed


# --- a scripted server that lies -------------------------------------------------------------------------------

class _Liar(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        first = int(m.group(1)) if m else None
        last = int(m.group(2)) if m and m.group(2) else None
        with srv.lock:
            srv.n += 1
            n = srv.n
            srv.asked.append((first, last))
            srv.if_range_of[n] = self.headers.get("If-Range")
        if n > 1:
            srv.second.set()
        status, headers, body, close = srv.script(n, first, last, srv.data)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        # The server's first answer, when it is one the client splits (an open range of two segments or more),
        # sends its first segment, then waits for a helper's request before the rest: else a fast first
        # connection may read the whole file before any helper starts, and a probe of the helpers probes nothing.
        gated = n == 1 and status == 206 and last is None and len(body) >= 2 * download.SEGMENT_MIN \
            and download.SEGMENTS > 1
        try:
            if gated:
                self.wfile.write(body[:download.SEGMENT_MIN])
                self.wfile.flush()
                srv.second.wait(5)
                body = body[download.SEGMENT_MIN:]
            self.wfile.write(body)
        except OSError:
            pass
        if close:
            self.close_connection = True


def _honest(n, first, last, data):
    if first is None:
        return 200, {"Content-Length": str(len(data))}, data, False
    if first >= len(data):
        return 416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"}, b"", False
    end = len(data) if last is None else min(len(data), last + 1)
    return 206, {"Content-Length": str(end - first), "Content-Range": f"bytes {first}-{end - 1}/{len(data)}"}, \
        data[first:end], False


class Liar(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass

    def __init__(self, data: bytes, script=_honest):
        super().__init__(("127.0.0.1", 0), _Liar)
        self.data, self.script, self.n, self.asked, self.lock = data, script, 0, [], threading.Lock()
        self.if_range_of: dict[int, str | None] = {}  # request number → its If-Range
        self.second = threading.Event()  # set when a second request came
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/six.conda"


@pytest.fixture
def liar(six):
    root, sha = six
    data = (root / "six.conda").read_bytes()
    servers = []

    def make(script):
        srv = Liar(data, script)
        servers.append(srv)
        return srv

    yield make, data, sha
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _fetch(pkgs, url, sha, narrated=None, **kw):
    return cache.Cache(pkgs).fetch(url, sha, "six.conda",
                                   narrate=(narrated.append if narrated is not None else lambda m: None), **kw)


# --- answers of no length --------------------------------------------------------------------------------------

def test_an_empty_answer_is_checked_by_its_hash_not_a_stop_iteration(tmp_path, liar, one_connection):
    """A mirror whose file is empty (a sync that failed half-way) answers 200 with Content-Length: 0."""
    make, data, sha = liar
    srv = make(lambda n, first, last, data: (200, {"Content-Length": "0"}, b"", False))
    with pytest.raises(IntegrityError):
        _fetch(tmp_path / "pkgs", srv.url, sha)
    assert not _leftovers(tmp_path / "pkgs")
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    path, got = _fetch(tmp_path / "pkgs", srv.url, empty)  # a lock that names the empty file gets it
    assert path.stat().st_size == 0 and got == 0


def test_a_206_that_ends_where_the_kept_part_ends_is_checked_by_its_hash(tmp_path, liar):
    """A server that answers a resume with a Content-Range whose total is where the part stops."""
    make, data, sha = liar
    srv = make(lambda n, first, last, data: (206, {"Content-Length": "0",
                                                   "Content-Range": f"bytes {first}-{first}/{first}"}, b"", False)
               if first and last is None else _honest(n, first, last, data))  # a resume, not a segment
    c = cache.Cache(tmp_path / "pkgs")
    part = c.entry(sha, "six.conda").with_name(".six.conda.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    narrated = []
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha, narrated)  # checked, found short, fetched from the start
    assert cache.sha256_file(path) == sha and got == len(data)
    assert any("again from the start" in m for m in narrated), narrated


def test_a_content_length_that_is_not_a_number_is_not_a_traceback(tmp_path, liar, one_connection):
    make, data, sha = liar
    srv = make(lambda n, first, last, data: (200, {"Content-Length": "lots"}, data, True))
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)  # read to the connection's end: the right bytes
    assert cache.sha256_file(path) == sha and got == SIX


# --- servers that lie about ranges -----------------------------------------------------------------------------

def test_a_total_that_changes_between_requests_is_never_written_and_the_next_run_converges(tmp_path, liar,
                                                                                           monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 2)
    make, data, sha = liar

    def script(n, first, last, data):
        status, headers, body, close = _honest(n, first, last, data)
        if n > 1 and status == 206:  # the file "grew" after the first answer
            headers["Content-Range"] = headers["Content-Range"].rsplit("/", 1)[0] + f"/{len(data) + 1}"
        return status, headers, body, close

    srv = make(script)
    with pytest.raises(NetworkError) as info:
        _fetch(tmp_path / "pkgs", srv.url, sha)
    assert "did not answer with bytes" in info.value.why
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    assert download.kept_segments(part)
    _only_expected(tmp_path / "pkgs", sha)
    srv.script = _honest
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")


def test_a_206_of_another_range_than_asked_is_a_network_error_and_nothing_wrong_is_kept(tmp_path, liar,
                                                                                        monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 3)
    make, data, sha = liar

    def script(n, first, last, data):
        if last is not None and first:  # a helper's closed range: answered from one byte earlier
            return _honest(n, first - 1, last, data)
        return _honest(n, first, last, data)

    srv = make(script)
    with pytest.raises(NetworkError) as info:
        _fetch(tmp_path / "pkgs", srv.url, sha)
    assert "did not answer with bytes" in info.value.why
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    total, segments = download.kept_segments(part)
    held = part.read_bytes()
    assert total == len(data) and any(s.done for s in segments)
    for s in segments:  # every byte the sidecar says is written is the file's
        assert held[s.start:s.pos] == data[s.start:s.pos]
    srv.script = _honest
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)
    assert cache.sha256_file(path) == sha and got < len(data)



@pytest.mark.parametrize("total", [str(10**30), "9" * 5000])
def test_a_content_range_of_an_absurd_size_is_a_network_error_not_a_traceback(tmp_path, liar, monkeypatch, total):
    """A total past what a file can be (os.ftruncate raised OverflowError) or past what int() reads (ValueError:
    more than 4,300 digits) is an answer that does not say where its bytes go."""
    monkeypatch.setattr(download, "RETRIES", 2)
    make, data, sha = liar

    def script(n, first, last, data):
        status, headers, body, close = _honest(n, first, last, data)
        if status == 206:
            headers["Content-Range"] = headers["Content-Range"].rsplit("/", 1)[0] + f"/{total}"
        return status, headers, body, close

    srv = make(script)
    with pytest.raises(NetworkError):
        _fetch(tmp_path / "pkgs", srv.url, sha)
    srv.script = _honest
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)  # nothing kept wedges the next run
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")

def _once_a_segment(length_of):
    """A script answering honestly, except that each segment's first answer claims LENGTH_OF(body) bytes."""
    lock = threading.Lock()
    seen = set()

    def script(n, first, last, data):
        status, headers, body, close = _honest(n, first, last, data)
        with lock:
            once = status == 206 and last is not None and last not in seen
            seen.add(last)
        if once:
            headers["Content-Length"] = str(length_of(body))
        return status, headers, body, close
    return script


def test_a_206_whose_body_is_shorter_than_its_content_range_is_resumed(tmp_path, liar):
    make, data, sha = liar
    # Content-Length says less than Content-Range; then the rest comes anyway, on the same socket
    srv = make(_once_a_segment(lambda body: len(body) // 2))
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")


def test_a_206_whose_content_length_promises_more_than_comes_is_a_stall_then_resumed(tmp_path, liar, monkeypatch):
    monkeypatch.setenv("LORASTRAP_READ_TIMEOUT", "0.3")
    make, data, sha = liar
    srv = make(_once_a_segment(lambda body: len(body) + 10))
    narrated = []
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha, narrated)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")


def test_a_206_that_lies_about_its_bytes_is_an_integrity_error_and_leaves_nothing(tmp_path, liar):
    make, data, sha = liar

    def script(n, first, last, data):
        status, headers, body, close = _honest(n, first, last, data)
        if status == 206:  # the right range said, zeros sent: on every range, the first connection's open one too
            body = bytes(len(body))
        return status, headers, body, close

    srv = make(script)
    with pytest.raises(IntegrityError):
        _fetch(tmp_path / "pkgs", srv.url, sha)
    assert not _leftovers(tmp_path / "pkgs")


def test_a_segment_that_flaps_to_a_whole_file_answer_mid_way_converges(tmp_path, liar):
    """A helper's segment is cut half-way, and its retry is answered with the whole file (200)."""
    make, data, sha = liar
    lock = threading.Lock()
    state = {}

    def script(n, first, last, data):
        if last is None or first is None:
            return _honest(n, first, last, data)
        with lock:
            k = state.setdefault(last, 0)
            state[last] = k + 1
        if k == 0:
            status, headers, body, _ = _honest(n, first, last, data)
            return status, headers, body[:len(body) // 2], True  # cut
        if k == 1:
            return 200, {"Content-Length": str(len(data))}, data, False
        return _honest(n, first, last, data)

    srv = make(script)
    narrated = []
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha, narrated)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")


def _refused(tmp_path, six, faults) -> NetworkError:
    """The NetworkError of fetching six.conda when every request after the first meets FAULTS(port) in turn."""
    root, sha = six
    srv = NetSim(root, rate=4 * 2**20).start()
    srv.inject("six.conda", "none", *faults(srv.url.rsplit(":", 1)[1]))
    try:
        with pytest.raises(NetworkError) as info:
            _fetch_six(tmp_path / "pkgs", srv, sha)
    finally:
        srv.shutdown()
    return info.value


def test_a_redirect_of_a_segment_to_another_host_is_refused(tmp_path, six):
    err = _refused(tmp_path, six, lambda port: [f"redirect:http://localhost:{port}/six.conda"] * 20)
    assert "another host (localhost)" in err.why
    _only_expected(tmp_path / "pkgs", six[1])


def test_a_server_that_fails_every_segment_gives_every_permit_back(tmp_path, six, monkeypatch, permits):
    monkeypatch.setattr(download, "RETRIES", 2)
    err = _refused(tmp_path, six, lambda port: ["500"] * 40)
    assert "HTTP 500" in err.why
    assert permits._value == download.EXTRA_CONNECTIONS


# --- the disk ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_during_a_segment_write_is_a_disk_error_and_the_part_is_kept(tmp_path, six, monkeypatch, code):
    root, sha = six
    real = os.pwrite
    written = [0]
    lock = threading.Lock()

    def pwrite(fd, data, offset):
        with lock:
            if written[0] > 2 * 2**20:
                raise OSError(code, os.strerror(code))
            written[0] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    srv = NetSim(root, rate=8 * 2**20).start()
    try:
        t = time.monotonic()
        with pytest.raises(DiskError):
            _fetch_six(tmp_path / "pkgs", srv, sha)
        assert time.monotonic() - t < 3
        monkeypatch.setattr(os, "pwrite", real)
        part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
        assert download.kept_segments(part)
        path, got = _fetch_six(tmp_path / "pkgs", srv, sha)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha and got < SIX


def test_a_part_truncated_while_segments_write_never_passes_and_writes_nothing_beside_it(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=2 * 2**20).start()
    pkgs = tmp_path / "pkgs"
    part = pkgs / "archives" / sha / ".six.conda.part"

    def truncate():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if part.stat().st_size == SIX:
                    time.sleep(0.3)
                    os.truncate(part, 0)
                    return
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=truncate)
    t.start()
    try:
        with pytest.raises(IntegrityError):
            _fetch_six(pkgs, srv, sha)
        t.join()
        _only_expected(pkgs, sha)
        path, got = _fetch_six(pkgs, srv, sha)  # the next run starts afresh and converges
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha


# --- stop, Ctrl-C ------------------------------------------------------------------------------------------------

def test_a_stop_ends_a_segmented_download_at_once_and_keeps_its_part(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=2**20).start()
    stop = threading.Event()
    threading.Timer(0.8, stop.set).start()
    try:
        t = time.monotonic()
        with pytest.raises(download.Cancelled):
            cache.Cache(tmp_path / "pkgs").fetch(f"{srv.url}/six.conda", sha, "six.conda", stop=stop)
        took = time.monotonic() - t
    finally:
        srv.shutdown()
    assert took < 1.5, took
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    assert download.kept_segments(part)


@pytest.mark.parametrize("segments", [1, 8])
def test_a_stop_during_a_retry_pause_is_honoured_at_once(tmp_path, six, monkeypatch, segments):
    monkeypatch.setattr(download, "SEGMENTS", segments)
    root, sha = six
    srv = NetSim(root).start()
    srv.inject("six.conda", *["500"] * 4)  # the fourth failure pauses 2 s before the fifth attempt
    stop = threading.Event()
    when = []

    def stopper():
        while srv.requests["six.conda"] < 4:
            time.sleep(0.01)
        time.sleep(0.1)
        when.append(time.monotonic())
        stop.set()

    threading.Thread(target=stopper, daemon=True).start()
    try:
        with pytest.raises(download.Cancelled):
            cache.Cache(tmp_path / "pkgs").fetch(f"{srv.url}/six.conda", sha, "six.conda", stop=stop)
        took = time.monotonic() - when[0]
    finally:
        srv.shutdown()
    assert took < 0.5, took


def test_ctrl_c_in_the_main_thread_joins_the_helpers_and_keeps_the_sidecar(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=2**20).start()
    main = threading.main_thread()
    start = time.monotonic()

    class Interrupting:
        def add(self, n):
            if threading.current_thread() is main and time.monotonic() - start > 0.8:
                raise KeyboardInterrupt

        def done_one(self):
            pass

    try:
        with pytest.raises(KeyboardInterrupt):
            cache.Cache(tmp_path / "pkgs").fetch(f"{srv.url}/six.conda", sha, "six.conda", progress=Interrupting())
        took = time.monotonic() - start
        time.sleep(0.3)
        active = srv.active
    finally:
        srv.shutdown()
    assert took < 2, took
    assert active == 0  # no helper still reading
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    assert download.kept_segments(part)


def test_the_first_failure_of_a_later_archive_stops_a_long_earlier_one(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(8 * 2**20))
    (root / "bad.bin").write_bytes(b"x")
    srv = NetSim(root, rate=2**20).start()  # the big one would take a second or more, even in segments
    srv.inject("bad.bin", "404")
    items = [(f"{srv.url}/big.bin", cache.sha256_file(root / "big.bin"), "big.bin"),
             (f"{srv.url}/bad.bin", "0" * 64, "bad.bin")]
    try:
        t = time.monotonic()
        with pytest.raises(NetworkError) as info:
            cache.Cache(tmp_path / "pkgs").fetch_all(items, jobs=2)
        took = time.monotonic() - t
    finally:
        srv.shutdown()
    assert "HTTP 404" in info.value.why and took < 0.8, took


# --- sidecars that others touch --------------------------------------------------------------------------------

def _kept(pkgs, sha, data, held: int, sidecar_text: str):
    """A part of HELD bytes of the file beside a sidecar of SIDECAR_TEXT, as a damaged or edited cache has them."""
    part = pkgs / "archives" / sha / ".six.conda.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:held])
    download.sidecar(part).write_text(sidecar_text)
    return part


@pytest.mark.parametrize("validator", ['"\u4e2d"', '"\u20ac1"'])
def test_a_sidecar_validator_that_cannot_be_sent_is_not_a_traceback_nor_a_wedged_entry(tmp_path, liar,
                                                                                       one_connection, validator):
    """A validator no HTTP header can carry (not Latin-1: http.client cannot encode it) is no validator: the part
    is resumed without If-Range, and its hash decides."""
    make, data, sha = liar
    srv = make(_honest)
    _kept(tmp_path / "pkgs", sha, data, 1000, json.dumps({"validator": validator}))
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)
    assert cache.sha256_file(path) == sha and got == len(data) - 1000 and not _leftovers(tmp_path / "pkgs")


@pytest.mark.parametrize("doc", ['{"total": Infinity, "segments": [[0, 6291456, 0]]}',
                                 '{"total": 6291456, "segments": [[0, 1e999, 0]]}'])
def test_a_sidecar_of_infinite_numbers_is_a_sidecar_that_does_not_describe_the_part(tmp_path, liar, doc):
    """Python's json reads Infinity (and 1e999 as infinity): a sidecar holding one describes no part."""
    make, data, sha = liar
    srv = make(_honest)
    part = _kept(tmp_path / "pkgs", sha, data, SIX, doc)
    assert download.kept_segments(part) is None
    path, got = _fetch(tmp_path / "pkgs", srv.url, sha)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")


# --- If-Range: servers that refuse it, servers whose validators change -----------------------------------------

def _tagged(etag_of, *, cut: int | None = None, refuse: int | None = None):
    """(box, script): an honest server that tags each answer with ETag ETAG_OF(n) and a fixed Last-Modified and
    honours If-Range against that answer's own ETag; each body cut after CUT bytes; REFUSE: the status of every
    request that carries If-Range.  box[0] is to be the server (the script reads each request's If-Range there)."""
    modified = "Tue, 14 Nov 2023 22:13:20 GMT"
    box = []

    def script(n, first, last, data):
        etag, if_range = etag_of(n), box[0].if_range_of.get(n)
        if if_range is not None and refuse:
            return refuse, {"Content-Length": "0"}, b"", False
        status, headers, body, close = _honest(n, first if if_range in (None, etag, modified) else None, last, data)
        headers.update({"ETag": etag, "Last-Modified": modified})
        if cut is not None and len(body) > cut:
            return status, headers, body[:cut], True
        return status, headers, body, close
    return box, script


@pytest.mark.parametrize("segments", [1, 8])
@pytest.mark.parametrize("code", [400, 412])
def test_a_server_that_refuses_if_range_resumes_without_it_and_never_wedges_the_entry(tmp_path, liar, monkeypatch,
                                                                                     segments, code):
    """RFC 9110 13.1.5 has a server that does not take If-Range ignore it; some answer it with an error instead.
    The kept part is then resumed without it (its hash decides, as before If-Range), not refused at every run."""
    monkeypatch.setattr(download, "SEGMENTS", segments)
    monkeypatch.setattr(download, "RETRIES", 2)
    make, data, sha = liar
    box, script = _tagged(lambda n: '"same"', cut=200_000)
    box.append(make(script))
    with pytest.raises(NetworkError):
        _fetch(tmp_path / "pkgs", box[0].url, sha)
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    kept = part.stat().st_size if segments == 1 else None
    assert json.loads(download.sidecar(part).read_text())["validator"] == '"same"'
    again, box[0].script = _tagged(lambda n: '"same"', refuse=code)
    again.append(box[0])
    narrated = []
    path, got = _fetch(tmp_path / "pkgs", box[0].url, sha, narrated)
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")
    assert kept is None or got == len(data) - kept, got  # resumed, not downloaded again
    assert any("refuses If-Range" in m for m in narrated), narrated


@pytest.mark.parametrize("segments", [1, 8])
def test_a_mirror_whose_etag_differs_on_every_answer_still_resumes_across_runs(tmp_path, liar, monkeypatch,
                                                                               segments):
    """Load-balanced backends, each with its own inode-based ETag (Apache's old default): the file is the same,
    the ETag is not.  A link that cuts every answer needs several runs to get the file; before If-Range each run
    resumed where the last stopped.  An ETag that differed between the answers of one run cannot identify the file:
    the part is kept with the Last-Modified date (the same on every backend), so the next run resumes it, instead
    of the If-Range on the ETag failing at every run, the part started over and the file never complete."""
    monkeypatch.setattr(download, "SEGMENTS", segments)
    monkeypatch.setattr(download, "RETRIES", 2)
    make, data, sha = liar
    box, script = _tagged(lambda n: f'"{n:x}-600000"', cut=400_000)
    box.append(make(script))
    pkgs = tmp_path / "pkgs"
    for run in range(12):
        try:
            path, _ = _fetch(pkgs, box[0].url, sha)
            break
        except NetworkError:
            pass
    else:
        pytest.fail("the file never came whole")
    assert cache.sha256_file(path) == sha and not _leftovers(pkgs)
    sent = [v for v in box[0].if_range_of.values() if v is not None]
    assert sent and all(v == "Tue, 14 Nov 2023 22:13:20 GMT" for v in sent[1:]), sent


# --- two processes, one cache ----------------------------------------------------------------------------------

TWICE = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from lorastrap.install import cache, download
path, got = cache.Cache(Path(sys.argv[2])).fetch(sys.argv[3], sys.argv[4], "six.conda")
print(got)
"""


def test_two_processes_fetching_one_archive_into_one_cache(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=4 * 2**20).start()
    pkgs = tmp_path / "pkgs"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", TWICE, str(ROOT / "installer"), str(pkgs),
                                   f"{srv.url}/six.conda", sha], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        srv.shutdown()
    assert all(p.returncode == 0 for p in procs), outs
    got = sorted(int(o.strip()) for o, _ in outs)
    assert got == [0, SIX], got  # one downloaded it, the other used it
    assert not _leftovers(pkgs) and cache.sha256_file(pkgs / "archives" / sha / "six.conda") == sha


def test_an_index_page_over_the_limit_in_bytes_is_refused_whatever_its_characters(tmp_path, monkeypatch):
    """The page limit counts bytes: a page of multi-byte characters over it is refused, never parsed cut (its
    files past the cut silently missing)."""
    from lorastrap.locking import pypi_index
    monkeypatch.setattr(pypi_index, "MAX_PAGE_BYTES", 1000)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    (tmp_path / "simple" / "demo").mkdir(parents=True)
    link = '<a href="demo-1.0-py3-none-any.whl">demo-1.0-py3-none-any.whl</a>\n'
    (tmp_path / "simple" / "demo" / "index.html").write_text(link + "<!-- " + "é" * 700 + " -->\n" + link.replace(
        "1.0", "1.1"), encoding="utf-8")
    srv = NetSim(tmp_path).start()
    try:
        with pytest.raises(NetworkError) as info:
            pypi_index.files(f"{srv.url}/simple", "demo")
        assert "larger than" in info.value.what
    finally:
        srv.shutdown()


@pytest.mark.parametrize("how", ["tls-handshake", "proxy-headers", "connect"])
def test_a_stop_ends_a_tls_handshake_or_a_proxy_that_is_silent(tmp_path, monkeypatch, how):
    """A server that accepts the connection and then says nothing: during the TLS handshake (https), or before the
    headers of an answer through an http proxy; or one that never completes the connect (its accept queue full:
    the kernel drops the SYN, as a firewall would).  A stop (another archive's failure, Ctrl-C) ends the wait at
    once, not at the read timeout."""
    import socket
    monkeypatch.setenv("LORASTRAP_READ_TIMEOUT", "20")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    held = []
    port = listener.getsockname()[1]
    if how == "connect":
        listener.listen(0)  # one connection fills the queue; the next connect waits, unanswered
        held.append((socket.create_connection(("127.0.0.1", port)), None))
    else:
        listener.listen(8)
        threading.Thread(target=lambda: [held.append(listener.accept()) for _ in iter(int, 1)], daemon=True).start()
    if how in ("tls-handshake", "connect"):
        url = f"https://127.0.0.1:{port}/six.conda"
    else:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        url = "http://mirror.invalid/six.conda"
    stop = download.Stop()
    threading.Timer(0.5, stop.set).start()
    t = time.monotonic()
    try:
        with pytest.raises(download.Cancelled):
            download.into(url, tmp_path / ".six.conda.part", stop=stop)
        assert time.monotonic() - t < 5, time.monotonic() - t
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()


# --- the first connection, split while it reads ----------------------------------------------------------------

class _SplitThenWhole(http.server.BaseHTTPRequestHandler):
    """A 206 from byte 0, fast, cut at three quarters; the first connection's retry answered late with the whole
    file (200, its last byte held back a second); the helpers' closed ranges answered later still with other bytes
    (a stale backend, or someone on the path)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        good, other, size = srv.good, srv.other, len(srv.good)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        first, last = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
        with srv.lock:
            srv.n += 1
            n, whole = srv.n, srv.whole
            srv.whole = srv.whole or (n > 1 and last is None)
        try:
            if n == 1:
                self.send_response(206)
                self.send_header("Content-Length", str(size))
                self.send_header("Content-Range", f"bytes 0-{size - 1}/{size}")
                self.end_headers()
                self.wfile.write(good[:size * 3 // 4])
                self.close_connection = True
                return
            if last is None and not whole:
                time.sleep(1.0)
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.write(good[:-1])
                self.wfile.flush()
                time.sleep(1.0)
                self.wfile.write(good[-1:])
                return
            body = good[first:] if last is None else other[first:last + 1]
            if last is not None:
                time.sleep(3.0)
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{size}")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass


def test_a_whole_file_answered_to_a_retry_after_the_part_was_split_is_not_spliced_in(tmp_path, monkeypatch):
    """The first connection's retry is answered with the whole file (200) while its part was split meanwhile and
    helpers write other bytes into it: that answer is refused (decided under the split's lock), not taken as a
    fresh start over the helpers' segments, which the sha256 taken on the way had not seen — it vouched for the
    right file while the part held other bytes.  The hash is slowed to ~300 MB/s (a CPU without SHA instructions,
    or a busy one), so that the split comes while the retry waits for its answer."""
    class SlowSha:
        def __init__(self):
            self.h = hashlib.sha256()

        def update(self, data):
            time.sleep(len(data) / 300e6)
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    class SlowHashlib:
        sha256 = SlowSha
    monkeypatch.setattr(download, "hashlib", SlowHashlib)
    size = 64_000_000
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SplitThenWhole)
    srv.daemon_threads, srv.lock, srv.n, srv.whole = True, threading.Lock(), 0, False
    srv.good = os.urandom(size)
    srv.other = bytes(b ^ 0xFF for b in srv.good[:1 << 20]) * (size // (1 << 20) + 1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    want = hashlib.sha256(srv.good).hexdigest()
    pkgs = tmp_path / "pkgs"
    try:
        with pytest.raises(IntegrityError):
            cache.Cache(pkgs).fetch(f"http://127.0.0.1:{srv.server_address[1]}/f.conda", want, "f.conda")
    finally:
        srv.shutdown()
    assert not cache.Cache(pkgs).is_ready(want, "f.conda")


@pytest.mark.parametrize("mib", [16, 64])
def test_a_first_connection_that_stalls_is_split_and_not_waited_for(tmp_path, monkeypatch, mib):
    """A fast server whose first answer stalls halfway (then silence, longer than the test): the part is split and
    the stalled connection is shut down at once, not waited for until the read timeout — its segment ends where
    it stalled, the helpers fetch the rest.  16 MiB: the stall begins inside a pace window that brought bytes
    (slow, not empty); 64 MiB: one that brought none."""
    monkeypatch.setenv("LORASTRAP_READ_TIMEOUT", "60")
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(mib << 20)
    (root / "s.conda").write_bytes(data)
    srv = NetSim(root, stall_s=60).start()
    srv.inject("s.conda", "stall")
    part = tmp_path / ".s.conda.part"
    t = time.monotonic()
    try:
        got, sha = download.into(f"{srv.url}/s.conda", part)
        took = time.monotonic() - t
    finally:
        srv.shutdown()
    assert took < 20, took  # the stall would hold it 60 s
    assert sha == hashlib.sha256(data).hexdigest() == hashlib.sha256(part.read_bytes()).hexdigest()


def test_one_cut_of_a_fast_connection_is_one_retry_not_a_split(tmp_path):
    """The pause before a retry is no slow connection: a fast server that cuts the first answer once gets the
    rest in one more request from where it stopped, without helpers, and the narration says so once."""
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(64 << 20)
    (root / "c.conda").write_bytes(data)
    srv = NetSim(root).start()
    srv.inject("c.conda", "cut")
    part = tmp_path / ".c.conda.part"
    narrated = []
    try:
        got, sha = download.into(f"{srv.url}/c.conda", part, narrate=narrated.append)
        starts = srv.range_starts["c.conda"]
    finally:
        srv.shutdown()
    assert starts == [0, 32 << 20], starts
    assert sha == hashlib.sha256(data).hexdigest() and got == len(data)
    assert sum("retrying" in m for m in narrated) == 1 and not any("segment" in m for m in narrated), narrated
