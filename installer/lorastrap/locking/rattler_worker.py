"""The embedded engine (py-rattler), run in a child process only.

py-rattler 0.28 can crash at interpreter shutdown after its work succeeded (SIGSEGV 139 / SIGABRT 134,
"PyGILState_Release … finalizing"; measured on Debian 12 / Python 3.11: in 2 of 20 up to 22 of 50 runs).  So it never runs in a long-lived process: the parent sends a JSON request on stdin,
the worker writes its JSON answer to the result file named in the request (atomically), flushes, and leaves with
os._exit.  The parent judges the outcome by that file alone — an exit code mangled at shutdown cannot turn a
success into a failure or the reverse.

Requests:
  {"op": "solve", "channels": [...], "specs": [...], "platform": "linux-64", "virtual_packages": {"__cuda": "12.0"},
   "cache_dir": "...", "result": "/path/result.json"}
  {"op": "install", "lock": "/path/x.conda-lock.yml", "platform": "linux-64", "prefix": "...", "cache_dir": "...",
   "result": "..."}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _solve(req: dict) -> dict:
    import rattler
    from rattler import BuildString, Gateway, GenericVirtualPackage, MatchSpec, PackageName, Version

    vps = [GenericVirtualPackage(PackageName(n), Version(v), BuildString("0"))
           for n, v in req["virtual_packages"].items()]
    records = asyncio.run(asyncio.wait_for(rattler.solve(
        sources=req["channels"], specs=[MatchSpec(s) for s in req["specs"]],
        platforms=[req["platform"], "noarch"], virtual_packages=vps,
        gateway=Gateway(cache_dir=req["cache_dir"])), req.get("timeout")))
    out = []
    for r in records:
        out.append({
            "name": r.name.normalized, "version": str(r.version), "build": str(r.build),
            "build_number": r.build_number, "subdir": r.subdir, "url": str(r.url),
            "sha256": r.sha256.hex() if r.sha256 else None, "md5": r.md5.hex() if r.md5 else None,
            "depends": list(r.depends), "noarch": str(r.noarch) if r.noarch else None,
        })
    return {"ok": True, "records": out}


def _install(req: dict) -> dict:
    import rattler

    lock = rattler.LockFile.from_path(req["lock"])
    env = lock.default_environment()
    platform = next((p for p in env.platforms() if str(p) == req["platform"]), None)
    if platform is None:
        return {"ok": False, "error": f"platform {req['platform']} is not in {req['lock']}"}
    records = env.conda_repodata_records_for_platform(platform) or []
    if os.environ.get("LORASTRAP_PAUSE_AT") == "mid-link":  # crash-test hook: half linked, then wait to be killed
        first = [r for r in records if not r.noarch.python]  # noarch: python ones need python in the same install
        asyncio.run(rattler.install(first, target_prefix=req["prefix"],
                                    cache_dir=req["cache_dir"], execute_link_scripts=False))
        Path(req["prefix"] + ".paused-mid-link").write_text(str(os.getpid()))
        while True:
            time.sleep(60)
    asyncio.run(rattler.install(records, target_prefix=req["prefix"], cache_dir=req["cache_dir"],
                                show_progress=bool(req.get("show_progress")), execute_link_scripts=False))
    if req.get("show_progress"):  # py-rattler's bar stops mid-line: end it, so the next line starts on its own
        sys.stderr.write("\n")
        sys.stderr.flush()
    return {"ok": True, "installed": len(records)}


def _index(req: dict) -> dict:
    import rattler
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
        if isinstance(exc, asyncio.TimeoutError):
            return {"ok": False, "error": f"the solve did not finish within {req.get('timeout'):.0f} s",
                    "timed_out": True}
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def main() -> None:
    try:  # before the request: a worker started ahead of its request imports py-rattler while the parent works
        import rattler  # noqa: F401
    except BaseException:  # ImportError, or an interrupt: the request's own import says so in the answer
        pass
    text = sys.stdin.read()
    if not text.strip():  # started ahead and not needed after all
        os._exit(0)
    req = json.loads(text)
    try:
        result = answer(req)
    except BaseException as exc:  # an interrupt too: it goes into the answer
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    tmp = req["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, req["result"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
