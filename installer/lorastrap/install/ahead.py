"""Which engine will link, found before anything else is done; and the embedded engine's worker, started then.

The worker (``python -m lorastrap.install.worker``: an interpreter, asyncio and py-rattler's 80 MB library, ~70
ms on an idle core) is what a new environment's install waits for longest.  ``python -m lorastrap
install`` starts it first thing (lorastrap/__main__.py), before the command line's own modules are imported, so its
start-up overlaps all of the install's preparation; the link step takes it (``take``), and an install that ends
without linking lets it go (``discard``).  While the downloads go on it unpacks each checked archive into its
package cache (``unpack``), as the engines themselves do — with lorastrap's own unpacker (``into_cache``), in a few
threads of its own (install/worker.py).

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
BIG_MOST = 4  # big archives unpacked ahead at once, each in a thread of its own; more are left to the link step


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
    WORKERS.append(subproc.Worker("install.worker", show_progress=sys.stderr.isatty()))


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


# The worker unpacks a few archives at a time (install/worker.py), in the order they were checked.  A big archive
# is not queued behind the others there (two of 320 MiB behind the small ones made a cold install over a 40 MiB/s
# link 0.8 s slower): each is unpacked as soon as it is checked, in a thread of this process, at most BIG_MOST at
# once, by the same unpacker (archive.unpack: zstandard and tarfile, which leave the GIL while they decompress and
# write — a big archive's GIL is taken a block at a time, its members being few), not py-rattler's extract,
# which hashes the archive again, sha256 and md5 (320 MiB: ~1.0 s against ~0.35 s).  The link step waits for what
# they are unpacking (collect).
UNPACK_MAX = 64 * 2**20
_BIG_LOCK = threading.Lock()
BIG: list = []  # (dist, future) of each big archive being unpacked, until the link step collects them
_STOP = [threading.Event()]  # this install's: set, each big archive's unpacking ends within one block (_stopped)
_POOL: list = []  # the executor that unpacks them, once there is one


def unpack(archive: Path, sha256: str, cache_dir: Path) -> bool:
    """Give a checked archive to the worker started ahead (or, a big one, to a thread of this process), to unpack
    into the embedded engine's package cache (CACHE_DIR) while the other downloads go on, instead of every archive
    being unpacked only at the link step.  True when handed over; False when no worker was started ahead (the
    embedded engine will not link), the cache has a copy already (check_extracted looks at that one), BIG_MOST big
    archives (over UNPACK_MAX) are being unpacked already, or a big one is a .tar.bz2 (archive.unpack reads .conda
    archives only)."""
    from lorastrap.install.cache import dist_name
    dist = dist_name(archive.name)
    if not WORKERS or os.path.lexists(cache_dir / dist) or os.path.lexists(cache_dir / f"{dist}.lock"):
        return False
    try:
        big = archive.stat().st_size > UNPACK_MAX
    except OSError:
        return False
    if not big:
        return WORKERS[0].send({"op": "extract", "archive": str(archive), "dist": dist, "sha256": sha256,
                                "cache_dir": str(cache_dir)})
    with _BIG_LOCK:  # archives are checked in the download threads
        if len(BIG) >= BIG_MOST or not archive.name.endswith(".conda"):  # a big .tar.bz2: the link step's
            return False
        try:
            if not _POOL:
                from concurrent.futures import ThreadPoolExecutor  # here: a warm install unpacks nothing
                _POOL.append(ThreadPoolExecutor(max_workers=BIG_MOST, thread_name_prefix="lorastrap-unpack"))
            BIG.append((dist, _POOL[0].submit(into_cache, archive, dist, sha256, cache_dir, _STOP[0])))
        except RuntimeError:  # no thread to be had (a limit), or the interpreter is shutting down: the link step
            if _POOL:  # unpacks it; its job, queued already, is cancelled with the pool (a later one gets a new pool)
                _POOL.pop().shutdown(wait=False, cancel_futures=True)
            return False
        return True


def into_cache(archive: Path, dist: str, sha256: str, cache_dir: Path, stop: threading.Event) -> str:
    """One checked .conda archive into the package cache by lorastrap's own unpacker (rattler_worker.enter, the
    entry rattler itself makes) — a big one here, in a thread of this process, the others in the worker's threads
    (install/worker.py): "ok", or why not — never raises (the link step unpacks what this did not).  STOP set: it
    ends within one block, and what it unpacked is removed."""
    from lorastrap.install import archive as archives
    from lorastrap.install.cache import signature, verified_signature
    from lorastrap.locking.rattler_worker import enter
    checked = verified_signature(archive)  # what the archive's stats were when its sha256 was the lock's

    def fill(folder: Path) -> None:
        archives.unpack(archive, folder, unchanged=lambda st: checked is not None and signature(st) == checked,
                        stopped=stop.is_set)
    try:
        return enter(cache_dir, dist, sha256, fill)
    except archives.Changed:
        return "the archive changed after it was checked"
    except archives.Stopped:
        return "stopped"
    except Exception as exc:  # noqa: BLE001 - see the docstring: said by the link step, which unpacks it instead
        return f"{type(exc).__name__}: {exc}"


def collect(timeout: float) -> dict[str, str]:
    """What the big archives' threads unpacked ({dist: "ok", or why not}), once each has unpacked its archive —
    before the link step, which would otherwise unpack the same archive beside it.  Waited for even when it has
    only just started (the last archive to arrive is often a big one): the link step would take as long to unpack
    it, and then hash the copy whole after the link.  One that does not finish within TIMEOUT seconds is told to
    stop (its archive: the link step's)."""
    with _BIG_LOCK:
        futures = dict(BIG)  # kept in BIG until done: interrupted here, discard still stops them
    if not futures:
        return {}
    from concurrent.futures import wait  # here: a warm install imports no concurrent.futures (nor its logging)
    wait(futures.values(), timeout=timeout)
    if not all(future.done() for future in futures.values()):
        _stopped()
        wait(futures.values())
    with _BIG_LOCK:
        BIG[:] = [(dist, future) for dist, future in BIG if dist not in futures]
    return {dist: future.result() for dist, future in futures.items()}


def _stopped() -> None:
    """Tell the big archives' unpacking under way to stop (under _BIG_LOCK or not); the next ones get a new event."""
    _STOP[0].set()
    _STOP[0] = threading.Event()


def take() -> subproc.Worker | None:
    """The worker started ahead, for the link step: None when none was, or it died meanwhile (unpacking ahead is
    a speed-up only: its pipes and feeder end here, and a fresh worker unpacks what it needs)."""
    worker = WORKERS.pop() if WORKERS else None
    if worker is not None and worker.proc.poll() is not None:
        worker.discard()
        worker = None
    return worker


def discard(*, wait: bool = True) -> None:
    """Let the workers started ahead go: the install ends without linking (see subproc.Worker.discard); the big
    archives' unpacking is stopped, and waited for (a block, and the removal of what it had unpacked)."""
    while WORKERS:
        WORKERS.pop().discard(wait=wait)
    with _BIG_LOCK:
        futures = [future for _, future in BIG]
        BIG.clear()
        if futures:
            _stopped()  # each ends within one block, and removes what it unpacked
    if futures:  # waited for whatever WAIT says: the CLI leaves with os._exit right after, which would end them
        from concurrent.futures import wait as all_done  # before they removed their half-unpacked folders
        all_done(futures)
