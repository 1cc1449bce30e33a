"""``python -m lorastrap.install.worker``: the embedded engine's worker as ``lorastrap install`` starts it ahead
(install/ahead.py) — locking/rattler_worker.py's requests and answers, with one change: each checked .conda archive
of an "extract" request is unpacked by lorastrap's own unpacker (ahead.into_cache: archive.unpack into the entry
rattler itself makes), UNPACKERS at a time in threads of this process, instead of one after the other by py-rattler's
extract.

Why: py-rattler 0.28's extract hashes every archive again, sha256 and md5, that the download had checked already,
and holds the GIL while it does; lorastrap's unpacker hashes nothing and leaves the GIL while it decompresses and
writes.  On the large benchmark set (39 archives, 159 MiB, 4,041 files), one after the other in one process, warm
memory: py-rattler's extract 0.58-0.63 s of CPU, lorastrap's 0.40-0.45 s; md5 alone was ~10% of a cold install's
CPU samples (perf).  The archives still queued when the link request came were extracted by rattler.install, and
hashed again too; here every archive sent is unpacked before the link begins.  Threads of this process, not of
lorastrap's own: there the downloads' threads take the GIL between their reads, and an unpacker among them (its
Python part: a tar header, a file's open, mode and mtime a member) waits for it after each system call — tried
with 4 threads there, an archive of ~4 MiB took up to 0.7 s to unpack while the downloads ran (~70 ms after them),
and the link step waited ~0.5 s after the last download.  Here: the large set's cold install 1.17 s against 1.29 s
with py-rattler's extract (10 alternating rounds, micromamba 1.23 s).

A .tar.bz2 (lorastrap's unpacker reads .conda archives only) goes to py-rattler's extract as before.  Its stdin
ending before the answered request came (the install's process is gone), the unpackers stop within one block and
remove what they unpacked before the worker leaves; a worker killed (discard, when it was sent work) leaves its
half-unpacked folders to the next run's sweep (rattler_worker.enter).
"""

from __future__ import annotations

import os
import threading

from lorastrap.locking import rattler_worker

# Nothing else at import: a warm install's link waits for this worker's start (py-rattler's import), and sends no
# "extract" request — what unpacking needs (ahead, its core modules, pathlib) is imported at the first one.

UNPACKERS = max(1, min(4, os.cpu_count() or 1))  # at once; on 2 cores, 8 alternating rounds: 1, 2, 4 threads 1.27,
# 1.22, 1.34 s (the GIL: each thread's Python part waits for the others')


class Unpackers:
    """The "extract" requests this worker unpacks itself (rattler_worker.main's UNPACKERS): a pool, made at the
    first one."""

    def __init__(self) -> None:
        self.pool = None
        self.futures: dict[str, object] = {}
        self.stop = threading.Event()

    def take(self, req: dict) -> bool:
        """Start unpacking the archive of REQ; False for one that is not a .conda (py-rattler's extract's)."""
        if not str(req.get("archive", "")).endswith(".conda"):
            return False
        if req["dist"] in self.futures:  # sent twice: one unpacking, not two threads writing the one folder
            return True
        from pathlib import Path

        from lorastrap.install import ahead
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor  # here: a worker that only links never imports it
            self.pool = ThreadPoolExecutor(max_workers=UNPACKERS, thread_name_prefix="lorastrap-unpack")
        try:
            self.futures[req["dist"]] = self.pool.submit(ahead.into_cache, Path(req["archive"]), req["dist"],
                                                         req["sha256"], Path(req["cache_dir"]), self.stop)
        except BaseException:  # no thread to be had (a limit): submit had queued the job all the same — a thread
            self._drop_pool()  # started later would unpack it untracked, past the answer, beside the link step
            raise
        return True

    def _drop_pool(self) -> None:
        """Cancel what the pool has not begun (its futures: CancelledError in results) and let it go; the next
        request gets a new one."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def results(self) -> dict[str, str]:
        """{dist: "ok", or why not} of every archive taken, once each has been unpacked."""
        out = {}
        for dist, future in self.futures.items():
            try:
                out[dist] = future.result()
            except BaseException as exc:  # noqa: BLE001 - into_cache never raises: cancelled with a dropped pool
                out[dist] = f"{type(exc).__name__}: {exc}"
        return out

    def halt(self) -> None:
        """Stop them all — what has not begun is not begun, what has ends within one block and removes what it
        unpacked — and wait for that."""
        self.stop.set()
        self._drop_pool()
        self.results()


def main() -> None:
    rattler_worker.main(unpackers=Unpackers())


if __name__ == "__main__":
    main()
