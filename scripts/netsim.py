"""A loopback HTTP/1.1 file server with the shape of a real network, and faults on demand (tests and benchmarks).

    python scripts/netsim.py DIR [--port P] [--delay-ms 20] [--rate-mib 10]

It serves DIR with keep-alive and Range requests (`bytes=A-` and `bytes=A-B`: 206 / 416; ranges=False ignores
both, closed_ranges=False the second), each file with an ETag and a Last-Modified in nginx's way (`"MTIME-SIZE"` in
hex, seconds), and If-Range as RFC 9110 13.1.5 has it (the range only while the validator is the file's, else the
whole file: 200); and it can
- add a delay to every request (latency) and cap each connection's bandwidth (bytes per second), after a burst
  of `burst` bytes an answer if asked (a server that slows a connection down once it has sent that much);
- inject faults per file name, consumed one a request: "500", "404", "cut" (half the body, then the connection
  closes), "stall" (half the body, then silence for `stall_s`, then close), "lie" (a complete body whose bytes
  differ — a mirror serving something else under the right name), "lie-cut" (both: altered, then cut),
  "redirect:URL" (a 302 to URL).
It counts requests, Range requests (and records where each started), connections, the most connections open at
once and the most requests answered at once.
"""

from __future__ import annotations

import argparse
import email.utils
import http.server
import mimetypes
import re
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "NetSim"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connected(+1)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connected(-1)

    def _plain(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _target(self) -> Path:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = self.server.root / rel
        return path / "index.html" if path.is_dir() else path

    def do_HEAD(self) -> None:
        """What a file would be (clients such as uv ask before they fetch); no fault, no body, not recorded."""
        path = self._target()
        found = path.is_file() and self.server.root in path.resolve().parents
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size if found else 0))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        srv = self.server
        srv.answering(+1)
        try:
            self._get()
        finally:
            srv.answering(-1)

    def _get(self) -> None:
        srv = self.server
        path = self._target()
        fault = srv.next_fault(path.name)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        srv.record(path.name, bool(self.headers.get("Range")), int(m.group(1)) if m else None)
        if srv.auth is not None:
            import base64
            want = "Basic " + base64.b64encode(srv.auth.encode()).decode()
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="netsim"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if fault == "500":
            return self._plain(500, "injected server error")
        if fault and fault.startswith("redirect:"):  # "redirect:URL": a 302 to URL
            self.send_response(302)
            self.send_header("Location", fault[len("redirect:"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault == "404" or not path.is_file() or srv.root not in path.resolve().parents:
            return self._plain(404, "not found")
        st = path.stat()
        size = st.st_size
        etag, modified = f'"{int(st.st_mtime):x}-{size:x}"', email.utils.formatdate(int(st.st_mtime), usegmt=True)
        if_range = self.headers.get("If-Range")
        same = if_range is None or if_range in (etag, modified)  # a strong ETag, or the exact date
        if if_range is not None:
            srv.note_if_range(path.name, same)
        start, end, status = 0, size, 200
        if m and srv.ranges and same and (srv.closed_ranges or not m.group(2)):
            start = int(m.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        with open(path, "rb") as f:  # only the bytes asked for (a server reads a range, not the whole file)
            f.seek(start)
            body = f.read(end - start)
        if fault in ("lie", "lie-cut"):  # the file's first 64 bytes altered
            body = bytes(b ^ 0xFF if start + i < 64 else b for i, b in enumerate(body[:64])) + body[64:]
        data_len = size
        self.send_response(status)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{data_len}")
        self.end_headers()
        if fault in ("cut", "stall", "lie-cut"):
            self._send(body[:len(body) // 2])
            if fault == "stall":
                time.sleep(srv.stall_s)
            self.close_connection = True
            return
        self._send(body)

    def _send(self, body: bytes) -> None:
        rate = self.server.rate
        if not rate:
            self.wfile.write(body)
            return
        if self.server.burst:  # the first bytes of each answer at once, the rest at the capped rate
            self.wfile.write(body[:self.server.burst])
            body = body[self.server.burst:]
        step = max(1, rate // 50)  # 20 ms slices at the capped rate
        started = time.monotonic()
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            ahead = (i + step) / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


class NetSim(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: 16 connections opened at once overflowed it, and a dropped SYN is sent
    # again only after TCP's 1 s initial timeout — a cold install of the test set took 1.5 s instead of 0.65 s in
    # about one run in eight (three downloads started together, all ended 1.0 s later).  Real servers queue more
    # (nginx: 511); so does this one.
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (a cancelled or timed-out download) is part of the game

    def __init__(self, root: Path, *, port: int = 0, delay_s: float = 0.0, rate: int = 0, ranges: bool = True,
                 stall_s: float = 5.0, closed_ranges: bool = True, auth: str | None = None, burst: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.auth = auth  # "USER:PASSWORD": every GET must carry it as HTTP Basic auth (else 401)
        self.root = root.resolve()
        self.delay_s, self.rate, self.ranges, self.stall_s = delay_s, rate, ranges, stall_s
        self.burst = burst  # with a rate: the bytes of each answer sent before the cap applies (a server's burst)
        self.closed_ranges = closed_ranges  # False: `bytes=A-B` is answered with the whole file (200)
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.requests: dict[str, int] = defaultdict(int)
        self.range_requests: dict[str, int] = defaultdict(int)
        self.range_starts: dict[str, list[int]] = defaultdict(list)  # the first byte each Range request asked for
        self.if_range: dict[str, list[bool]] = defaultdict(list)  # each If-Range a file got: did it still match?
        self.connections = self.open = self.max_open = 0
        self.active = self.max_active = 0  # GET requests being answered at once
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, filename: str, *faults: str) -> None:
        with self._lock:
            self.faults[filename].extend(faults)

    def next_fault(self, filename: str) -> str | None:
        with self._lock:
            queue = self.faults.get(filename)
            return queue.popleft() if queue else None

    def record(self, filename: str, ranged: bool, start: int | None = None) -> None:
        with self._lock:
            self.requests[filename] += 1
            self.range_requests[filename] += ranged
            if start is not None:
                self.range_starts[filename].append(start)

    def note_if_range(self, filename: str, matched: bool) -> None:
        with self._lock:
            self.if_range[filename].append(matched)

    def answering(self, change: int) -> None:
        with self._lock:
            self.active += change
            self.max_active = max(self.max_active, self.active)

    def connected(self, change: int) -> None:
        with self._lock:
            self.open += change
            self.connections += change > 0
            self.max_open = max(self.max_open, self.open)

    def start(self) -> "NetSim":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--rate-mib", type=float, default=10, help="per connection; 0: no cap")
    args = ap.parse_args()
    srv = NetSim(args.root, port=args.port, delay_s=args.delay_ms / 1000, rate=int(args.rate_mib * 2**20))
    print(f"serving {args.root} on {srv.url} (+{args.delay_ms:g} ms a request, {args.rate_mib:g} MiB/s a connection)",
          flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
