"""The embedded engine (py-rattler), run in a child process only.

py-rattler 0.28 can crash at interpreter shutdown after its work succeeded (SIGSEGV 139 / SIGABRT 134,
"PyGILState_Release … finalizing"; measured on Debian 12 / Python 3.11: in 2 of 20 up to 22 of 50 runs).  So it never runs in a long-lived process: the parent sends a JSON request on stdin,
the worker writes its JSON answer to the result file named in the request (atomically), flushes, and leaves with
os._exit.  The parent judges the outcome by that file alone — an exit code mangled at shutdown cannot turn a
success into a failure or the reverse.

Requests, one JSON document a line on stdin: any number of "extract" ones, then the one answered:
  {"op": "extract", "archive": "/cache/archives/…/x.conda", "dist": "x-1.0-h0_0", "sha256": "…", "cache_dir": "…"}
  {"op": "solve", "channels": [...], "specs": [...], "platform": "linux-64", "virtual_packages": {"__cuda": "12.0"},
   "cache_dir": "...", "result": "/path/result.json"}
  {"op": "install", "lock": "/path/x.conda-lock.yml", "platform": "linux-64", "prefix": "...", "cache_dir": "...",
   "result": "..."}
The answer carries "extracted" when "extract" requests came before it: what each came to ({dist: "ok", or why
not}).  Here each is py-rattler's extract; the worker ``lorastrap install`` starts ahead (install/worker.py) unpacks
.conda archives with lorastrap's own unpacker instead, in a few threads, and hands this loop the rest.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback


def _asyncio_without_tls() -> None:
    """Import asyncio (py-rattler's awaitables want its running loop) in this worker without its TLS transports:
    every request's networking is py-rattler's own, and asyncio's optional `import ssl` (OpenSSL's libraries,
    ssl.py's enums) was ~5 ms of the worker's start-up, which a warm install waits for.  asyncio takes ssl as
    missing then (its modules keep ssl = None); ssl itself stays importable afterwards.  The functions below import
    asyncio where they use it: in lorastrap's own process (answer, for a solve) it is imported as usual."""
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  (None: the import system's "not importable")
    try:
        importlib.import_module("asyncio")
    finally:
        del sys.modules["ssl"]


def _authenticated(auth_file: str):
    """A client whose auth middleware holds the private channels' logins of AUTH_FILE (solve._solver_logins):
    rattler_networking reads RATTLER_AUTH_FILE once, when the middleware is made — so the variable is put back
    and the file removed right after."""
    from rattler.networking import AuthenticationMiddleware, Client  # after _solve's _rattler()
    before = os.environ.get("RATTLER_AUTH_FILE")
    os.environ["RATTLER_AUTH_FILE"] = auth_file
    try:
        return Client([AuthenticationMiddleware()])
    finally:
        if before is None:
            os.environ.pop("RATTLER_AUTH_FILE", None)
        else:
            os.environ["RATTLER_AUTH_FILE"] = before
        try:
            os.unlink(auth_file)
        except OSError:
            pass


def _rattler():
    """py-rattler's package with its Python wrappers, imported from / when the current folder was removed: its
    ChannelConfig takes os.getcwd() as a default argument, evaluated at import (core.fsutil.sound_cwd)."""
    from lorastrap.core.fsutil import sound_cwd
    with sound_cwd():
        import rattler
    return rattler


def _solve(req: dict) -> dict:
    rattler = _rattler()
    from rattler import BuildString, Gateway, GenericVirtualPackage, MatchSpec, PackageName, Version

    vps = [GenericVirtualPackage(PackageName(n), Version(v), BuildString("0"))
           for n, v in req["virtual_packages"].items()]
    client = _authenticated(req["auth_file"]) if req.get("auth_file") else None
    import asyncio
    records = asyncio.run(asyncio.wait_for(rattler.solve(
        sources=req["channels"], specs=[MatchSpec(s) for s in req["specs"]],
        platforms=[req["platform"], "noarch"], virtual_packages=vps,
        gateway=Gateway(cache_dir=req["cache_dir"], client=client)), req.get("timeout")))
    out = []
    for r in records:
        out.append({
            "name": r.name.normalized, "version": str(r.version), "build": str(r.build),
            "build_number": r.build_number, "subdir": r.subdir, "url": str(r.url),
            "sha256": r.sha256.hex() if r.sha256 else None, "md5": r.md5.hex() if r.md5 else None,
            "depends": list(r.depends), "noarch": str(r.noarch) if r.noarch else None,
        })
    return {"ok": True, "records": out}


def _native():
    """py-rattler's compiled module (``rattler.rattler``) alone: what an install and an unpacking need
    (``PyLockFile``, ``py_install``, ``extract``) without the package's own ``__init__``, whose Python wrappers of
    every other API (index, sigstore, the gateway, typing and inspect) took 25-30 ms of the worker's ~95 ms start on
    these machines — the time a warm install waits for the worker.  The release is pinned (pyproject.toml); where
    the module is not where that release keeps it, the package is imported the usual way, which loads the same
    module."""
    import importlib.machinery
    import importlib.util
    if "rattler.rattler" in sys.modules:
        return sys.modules["rattler.rattler"]
    spec = importlib.util.find_spec("rattler")  # finds the package without running it
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [os.path.join(d, f"rattler{suffix}")
             for d in folders for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [f for f in found if os.path.isfile(f)]
    if not found:
        return _rattler().rattler  # the package's __init__ loads its compiled module
    native_spec = importlib.util.spec_from_file_location("rattler.rattler", found[0])
    module = importlib.util.module_from_spec(native_spec)
    sys.modules["rattler.rattler"] = module  # one load a process: `import rattler` later finds this one
    try:
        native_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["rattler.rattler"]  # not left half loaded: the request's own call says what failed
        raise
    return module


class _Record:
    """What py_install takes for a record: an object holding the native one as ``_record`` (as the package's
    RepoDataRecord does)."""
    __slots__ = ("_record",)

    def __init__(self, record) -> None:
        self._record = record


def _install(req: dict) -> dict:
    native = _native()
    lock = native.PyLockFile.from_path(req["lock"])
    env = lock.default_environment()
    platform = next((p for p in env.platforms() if p.name == req["platform"]), None) if env else None
    if platform is None:
        return {"ok": False, "error": f"platform {req['platform']} is not in {req['lock']}"}
    records = [_Record(r) for r in env.conda_repodata_records_for_platform(platform) or []]

    async def linked(chosen: list, show_progress: bool) -> None:  # py_install wants a running event loop
        await native.py_install(
            records=chosen, target_prefix=req["prefix"], cache_dir=req["cache_dir"], installed_packages=None,
            reinstall_packages=None, ignored_packages=None, platform=None, client=None, execute_link_scripts=False,
            show_progress=show_progress, requested_specs=None, reporter=None, alternative_target_prefix=None,
            config=None, attestation_policy=None, package_cache=None)

    def link(chosen: list, *, show_progress: bool = False) -> None:
        import asyncio
        asyncio.run(linked(chosen, show_progress))
    if os.environ.get("LORASTRAP_PAUSE_AT") == "mid-link":  # crash-test hook: half linked, then wait to be killed
        link([r for r in records if not r._record.noarch.is_python])  # noarch: python ones need python with them
        with open(req["prefix"] + ".paused-mid-link", "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(60)
    link(records, show_progress=bool(req.get("show_progress")))
    if req.get("show_progress"):  # py-rattler's bar stops mid-line: end it, so the next line starts on its own
        sys.stderr.write("\n")
        sys.stderr.flush()
    return {"ok": True, "installed": len(records)}


def _index(req: dict) -> dict:
    rattler = _rattler()
    import asyncio
    asyncio.run(rattler.index.index_fs(req["channel"], write_zst=False, write_shards=False, force=True))
    return {"ok": True}


def answer(req: dict) -> dict:
    """The answer to one request; a failure is an answer too (the caller decides).  Also called in the lorastrap
    process itself for a solve when that process leaves with os._exit (solve.py)."""
    try:
        return {"solve": _solve, "install": _install, "index": _index}[req["op"]](req)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # everything goes into the answer; the parent decides
        from lorastrap.core.errors import Interrupted
        if isinstance(exc, Interrupted):  # in lorastrap's own process: a SIGTERM/SIGHUP is its stop, not an answer
            raise
        import asyncio
        if isinstance(exc, asyncio.TimeoutError):
            return {"ok": False, "error": f"the solve did not finish within {req.get('timeout'):.0f} s",
                    "timed_out": True}
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


_SWEPT: list = []  # the package cache, once swept in this process


def _extract(req: dict) -> str:
    """Unpack one checked archive into the embedded engine's package cache while the parent still downloads the
    others (py-rattler 0.28's own unpacking; rattler.install then only links it): ``enter``, filled by py-rattler's
    extract, whose sha256 of the bytes it unpacked must be the lock's.  Answers as ``enter`` does; "left" (in main)
    when the answered request came before its turn.  (install/worker.py's worker: a .tar.bz2 only.)"""
    from pathlib import Path  # here: a worker that only links (a warm install) never imports it (~3 ms)

    def fill(tmp: Path) -> str | None:
        got, _ = _native().extract(Path(req["archive"]), tmp)
        if bytes(got).hex() != req["sha256"]:
            return f"unpacked bytes have sha256 {bytes(got).hex()}, the lock says {req['sha256']}"
        return None
    return enter(Path(req["cache_dir"]), req["dist"], req["sha256"], fill)


def enter(cache, dist: str, sha256: str, fill) -> str:
    """Make the package cache entry of DIST in CACHE (a pathlib.Path) as rattler itself leaves one: the folder
    CACHE/DIST and its metadata file CACHE/DIST.lock — the revision (8 bytes, big-endian) and the archive's sha256
    (32 bytes), rattler_cache's CacheMetadataFile — made under rattler's own cache lock (CACHE/.cache.lock, flock).
    FILL(folder) fills the folder under a private name (None when it did; else why not, and nothing is entered);
    it is renamed into place after.  An entry already there is left alone (the parent's check, then rattler,
    decide about it).  Answers "ok", "present", or why not (the link step then unpacks it as before)."""
    import fcntl
    import struct

    from lorastrap.core import fsutil, paths
    folder, record = cache / dist, cache / f"{dist}.lock"
    if folder.exists() or record.exists():
        return "present"
    cache.mkdir(parents=True, exist_ok=True)
    if cache not in _SWEPT:  # what unpackers killed while unpacking left, on this node: once a run, every package's
        _SWEPT.append(cache)
        fsutil.remove_orphans(cache, paths.PARTIAL, marked=True)
    tmp = cache / f".{dist}{paths.PARTIAL}{fsutil.owner_tag()}.d"
    pending = cache / f".{dist}.lock{paths.PARTIAL}{fsutil.owner_tag()}.r"  # the record, whole or not at all
    try:
        why_not = fill(tmp)
        if why_not:
            return why_not
        with open(cache / ".cache.lock", "a+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            if folder.exists() or record.exists():
                return "present"
            with open(pending, "wb") as f:  # written in place after the rename, a kill in between left it empty
                f.write(struct.pack(">Q", 1) + bytes.fromhex(sha256))
            os.rename(tmp, folder)
            os.replace(pending, record)
        return "ok"
    finally:
        fsutil.rmtree_quietly(tmp)
        try:
            pending.unlink()
        except FileNotFoundError:
            pass


def _requests():
    """(request, whether the answered one has come already) for each request on stdin, one JSON document a line,
    read in a thread of its own; None at the end of stdin.  The parent's feeder keeps writing while an archive is
    unpacked (py-rattler's extract holds the GIL, so this thread reads between two)."""
    import queue
    import threading
    lines: queue.Queue = queue.Queue()
    last = threading.Event()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                try:
                    req = json.loads(line)
                except ValueError:  # main reads it again and fails as it always did
                    req = line
                if not (isinstance(req, dict) and req.get("op") == "extract"):
                    last.set()
                lines.put(req)
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    while (req := lines.get()) is not None:
        yield (req if isinstance(req, dict) else json.loads(req)), last.is_set()
    yield None, True


def main(unpackers=None) -> None:
    """The worker's loop.  UNPACKERS: the install room's own unpacking of "extract" requests (install/worker.py:
    take(req) -> whether it took it, results() -> {dist: "ok" or why not} once all are done, halt()), else each is
    py-rattler's extract, one after the other."""
    _asyncio_without_tls()
    try:  # before the request: a worker started ahead of its request loads py-rattler while the parent works
        _native()
    except BaseException:  # ImportError, or an interrupt: the request's own import says so in the answer
        pass
    extracted: dict[str, str] = {}
    for req, last_came in _requests():  # "extract" requests as the parent's downloads finish, then the one to answer
        if req is None:  # started ahead and not needed after all
            if unpackers is not None:
                unpackers.halt()  # nothing half unpacked left behind
            os._exit(0)
        if req.get("op") != "extract":
            break
        try:
            if unpackers is not None and unpackers.take(req):
                continue
        except BaseException as exc:  # noqa: BLE001 - no thread to be had: left to the link step, as below
            extracted[req["dist"]] = f"{type(exc).__name__}: {exc}"
            continue
        if last_came:  # the link step is waiting: what is still queued it unpacks, several at once, not one by one
            extracted[req["dist"]] = "left"
            continue
        try:
            extracted[req["dist"]] = _extract(req)
        except BaseException as exc:  # not fatal (a pyo3 PanicException is no Exception): the link step unpacks it
            extracted[req["dist"]] = f"{type(exc).__name__}: {exc}"
    if unpackers is not None:  # all of them before the link: none is left to rattler's extract, which hashes again
        extracted.update(unpackers.results())
    try:
        result = answer(req)
    except BaseException as exc:  # an interrupt too: it goes into the answer
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if extracted:
        result["extracted"] = extracted
    tmp = req["result"] + ".tmp"
    with open(tmp, "w") as f:  # read by the parent as soon as this process has left: no fsync
        json.dump(result, f)
    os.replace(tmp, req["result"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
