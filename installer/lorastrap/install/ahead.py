"""Which engine will link, found before anything else is done; and the embedded engine's worker, started then.

The worker (``python -m lorastrap.locking.rattler_worker``: an interpreter, asyncio and py-rattler's 80 MB
library, ~70 ms on an idle core) is what a new environment's install waits for longest.  ``python -m lorastrap
install`` starts it first thing (lorastrap/__main__.py), before the command line's own modules are imported, so its
start-up overlaps all of the install's preparation; the link step takes it (``take``), and an install that ends
without linking lets it go (``discard``).  While the downloads go on it unpacks each checked archive into its
package cache (``unpack``), as the engines themselves do.

This module is imported before the rest, so it imports only the light part of core (no records, no errors module
at import time): each millisecond here is one the worker starts later.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from lorastrap.core import fsutil, paths, subproc

WORKERS: list[subproc.Worker] = []  # the one started ahead, until the link step takes it or it is let go
BIG: list[subproc.Worker] = []  # one a big archive, unpacking it while the downloads go on (see unpack)
BIG_MOST = 4  # big archives unpacked ahead at once, each in a worker of its own; more are left to the link step


def candidates(choice: str) -> list[tuple[str, str, str]]:
    """The micromamba/mamba executables CHOICE ("auto", "micromamba" or "mamba") may use: (kind, path, where
    found), in the order they are tried — MAMBA_EXE, PATH (without shims), the data dir's bin/."""
    found: list[tuple[str, str, str]] = []
    if os.environ.get("MAMBA_EXE"):
        exe = os.environ["MAMBA_EXE"]
        found.append(("mamba" if Path(exe).name.startswith("mamba") else "micromamba", exe, "MAMBA_EXE"))
    for kind in (["micromamba", "mamba"] if choice == "auto" else [choice]):
        on_path = fsutil.on_path(kind)
        if on_path:
            found.append((kind, on_path, "PATH"))
        bundled = paths.data_dir() / "bin" / kind  # the copy setup.sh fetched
        if bundled.exists():
            found.append((kind, str(bundled), "the data dir"))
    return [c for c in found if choice == "auto" or c[0] == choice]


def start(choice: str | None) -> None:
    """Start the embedded engine's worker now when it will most likely link (--engine rattler, or auto with no
    micromamba/mamba anywhere it is looked for); one at most."""
    choice = choice or os.environ.get("LORASTRAP_ENGINE") or "auto"
    if WORKERS or not (choice == "rattler" or (choice == "auto" and not candidates("auto"))):
        return
    WORKERS.append(subproc.Worker("locking.rattler_worker", show_progress=sys.stderr.isatty()))


def start_guessing(argv: list[str]) -> None:
    """``start`` for the command line ARGV (the words after ``install``), before it is parsed: its ``--engine``
    flag if it names one plainly, else the default.  A guess only, made before the command line's own error
    handling: whatever goes wrong here (a LORASTRAP_HOME that is no folder, a worker that cannot start) starts
    nothing and says nothing — the install itself meets the same error later and explains it."""
    choice = None
    for i, word in enumerate(argv):
        if word == "--engine" and i + 1 < len(argv):
            choice = argv[i + 1]
        elif word.startswith("--engine="):
            choice = word.partition("=")[2]
    try:
        start(choice if choice in ("auto", "micromamba", "mamba", "rattler") else None)
    except Exception:  # noqa: BLE001 - see the docstring: never a traceback from a guess
        pass


# The worker unpacks one archive at a time (py-rattler 0.28's extract holds the GIL: 2 or 4 threads unpacked the
# large set's 39 archives no faster than 1), while the link step unpacks several at once.  So a big archive is not
# queued behind the others in that worker (two of 320 MiB one after the other made a cold install over a 40 MiB/s
# link 0.8 s slower: the worker's 1.6 s against rattler's 0.9 s): each gets a worker of its own, started when it
# is checked, at most BIG_MOST at once; the link step waits for what they are unpacking (collect).
UNPACK_MAX = 64 * 2**20


def unpack(archive: Path, sha256: str, cache_dir: Path) -> bool:
    """Give a checked archive to the worker started ahead, to unpack into its package cache (CACHE_DIR) while the
    other downloads go on, instead of every archive being unpacked only at the link step.  True when handed over;
    False when no worker was started ahead, the cache has a copy already (check_extracted looks at that one), or
    BIG_MOST big archives (over UNPACK_MAX) are unpacked already."""
    from lorastrap.install.cache import dist_name
    dist = dist_name(archive.name)
    if not WORKERS or os.path.lexists(cache_dir / dist) or os.path.lexists(cache_dir / f"{dist}.lock"):
        return False
    try:
        big = archive.stat().st_size > UNPACK_MAX
    except OSError:
        return False
    request = {"op": "extract", "archive": str(archive), "dist": dist, "sha256": sha256, "cache_dir": str(cache_dir)}
    if not big:
        return WORKERS[0].send(request)
    with _BIG_LOCK:  # archives are checked in the download threads
        if len(BIG) >= BIG_MOST:
            return False
        try:
            BIG.append(_started_by_a_lasting_thread())
        except (OSError, RuntimeError):  # no process or thread to be had (a limit): the link step unpacks it
            return False
        return BIG[-1].send(request)


_BIG_LOCK = threading.Lock()
_STARTER: list = []  # the one-thread executor that starts the big archives' workers, once there is one


def _started_by_a_lasting_thread() -> subproc.Worker:
    """A worker started by a thread that lives as long as this process (an executor's: its thread waits for the
    next job until shutdown): a child dies with the thread that started it (setpriv --pdeathsig: PR_SET_PDEATHSIG
    is the parent thread's), and the download threads that check a big archive end with the downloads, before the
    link step asks what the worker unpacked.  RuntimeError when no thread can be had."""
    from concurrent.futures import ThreadPoolExecutor  # here: this module is imported before the worker starts
    if not _STARTER:
        starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastrap-worker-start")
        starter.submit(int).result()  # its thread started by a job that starts nothing; the executor kept only then
        _STARTER.append(starter)
    return _STARTER[0].submit(subproc.Worker, "locking.rattler_worker", "--unpack-only").result()


def collect(timeout: float) -> dict[str, str]:
    """What the big archives' workers unpacked ({dist: "ok", or why not}), once each has unpacked its archive —
    before the link step, which would otherwise unpack the same archive beside it.  Waited for even when it has
    only just started (the last archive to arrive is often a big one): the link step would take as long to unpack
    it, and then hash the copy whole after the link; the worker compares the sha256 of the bytes it unpacked with
    the lock's as it goes.  A worker that died answers nothing: the link step unpacks its archive (and the check
    after the link covers that copy)."""
    done: dict[str, str] = {}
    while BIG:
        answer = BIG.pop(0).ask({"op": "unpacked"}, timeout=timeout)
        done.update(answer.get("extracted") or {})
    return done


def take() -> subproc.Worker | None:
    """The worker started ahead, for the link step: None when none was, or it died meanwhile (unpacking ahead is
    a speed-up only: its pipes and feeder end here, and a fresh worker unpacks what it needs)."""
    worker = WORKERS.pop() if WORKERS else None
    if worker is not None and worker.proc.poll() is not None:
        worker.discard()
        worker = None
    return worker


def discard(*, wait: bool = True) -> None:
    """Let the workers started ahead go: the install ends without linking (see subproc.Worker.discard)."""
    while WORKERS:
        WORKERS.pop().discard(wait=wait)
    while BIG:
        BIG.pop().discard(wait=wait)
