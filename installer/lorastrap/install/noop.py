"""The quick no-op: an `install` that would change nothing answers from a stamp, without planning, locking or
importing the transaction.

After an install (or a full no-op check) succeeds, PREFIX/conda-meta/lorastrap/noop.json keeps
- the key: a sha256 over everything the outcome depends on — the command's flags, what the plan reads of the
  machine (platform, virtual packages, devices), the stat (mtime, size) of every file of the profiles folder and of
  the user's locks, lorastrap's own environment variables and version, and the stat of the environment's record;
- the conda-meta signature: each conda-meta/*.json's name, mtime and size;
- the damage manifest: every file of the environment's packages with the size it must have (-1: only present),
  as ``prefix.damage_manifest`` lists them — the same check the full no-op makes, without reading conda-meta;
- the result the full run printed for a no-op.

A later run whose key and signature match and whose files pass the manifest (one lstat each) prints that result
again.  Anything else — a journal or a rollback in progress next to PREFIX, a changed profile, lock, flag or machine,
a file missing or resized — falls through to the full run, which decides (and rewrites the stamp).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STAMP = Path("conda-meta") / "lorastrap" / "noop.json"
VERSION = 1


def _stat(path: Path) -> list:
    try:
        st = os.stat(path)
        return [st.st_mtime_ns, st.st_size]
    except OSError:
        return []


def _tree(root: Path) -> list:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(folder, name)
            out.append([os.path.relpath(p, root), *_stat(Path(p))])
    return out


def conda_meta_signature(prefix: Path) -> list:
    try:
        with os.scandir(prefix / "conda-meta") as it:
            entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in it
                             if e.name.endswith(".json") and e.is_file())
    except OSError:
        return []
    return [list(e) for e in entries]


def key(*, prefix: Path, envs_dir: Path, flags: dict, machine: dict) -> str:
    """What the outcome of `install` into PREFIX depends on, hashed."""
    from lorastrap import __version__
    from lorastrap.core import paths
    siblings = []
    try:
        siblings = sorted(n for n in os.listdir(prefix.parent) if n.startswith(prefix.name + ".lorastrap-"))
    except OSError:
        pass
    facts = {
        "version": __version__, "stamp": VERSION, "prefix": str(prefix), "flags": flags, "machine": machine,
        "envs": _tree(envs_dir), "locks": _tree(paths.data_dir() / "locks"),
        "environ": sorted((k, v) for k, v in os.environ.items()
                          if k.startswith("LORASTRAP_") and k not in ("LORASTRAP_QUIET", "LORASTRAP_DEBUG")),
        "record": _stat(prefix / "conda-meta" / "lorastrap" / "record.json"),
        "siblings": siblings,  # a journal, a backup or a rollback in progress: the full run handles it
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def machine_facts(machine) -> dict:
    """What a plan reads of the machine (not free memory or disk, which change from run to run)."""
    return {"platform": machine.platform, "vp": machine.virtual_packages,
            "devices": [d.model_dump() for d in machine.devices],
            "gpus": [[g.name, g.compute_capability, g.error] for g in machine.nvidia.gpus],
            "driver": machine.nvidia.driver_version, "findings": sorted(f.code for f in machine.findings)}


def check_files(prefix: Path, manifest: list) -> bool:
    """Every file of the manifest there, at its size where one is given."""
    lstat, join = os.lstat, os.path.join
    root = str(prefix)
    for rel, size in manifest:
        try:
            st = lstat(join(root, rel))
        except OSError:
            return False
        if size >= 0 and st.st_size != size:
            return False
    return True


def answer(prefix: Path, k: str) -> dict | None:
    """The result a full run printed for this no-op, when the stamp still holds; None: run in full."""
    try:
        stamp = json.loads((prefix / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("key") != k or stamp.get("meta") != conda_meta_signature(prefix):
        return None
    if not check_files(prefix, stamp.get("files") or []):
        return None
    return stamp.get("result")


def write(prefix: Path, k: str, result: dict, manifest: list) -> None:
    """Keep the stamp (best effort: a read-only prefix only loses the quick path)."""
    from lorastrap.core import fsutil
    try:
        fsutil.write_atomic(prefix / STAMP, json.dumps({"key": k, "meta": conda_meta_signature(prefix),
                                                        "files": manifest, "result": result}))
    except OSError:
        pass


def forget(prefix: Path) -> None:
    try:
        (prefix / STAMP).unlink()
    except OSError:
        pass


def _resolved(prefix: Path) -> Path:
    """PREFIX as the transaction will use it (a link to a folder is followed, as transaction.check_prefix does)."""
    return prefix.resolve() if prefix.is_symlink() else prefix


def lookup(prefix: Path, *, envs_dir: Path, flags: dict, machine) -> tuple[dict | None, dict]:
    """(the result an earlier run printed, when nothing it depends on moved — else None; what ``remember`` needs
    to stamp the full run's result)."""
    inputs = {"envs_dir": envs_dir, "flags": {k: str(v) for k, v in flags.items()}, "machine": machine_facts(machine)}
    try:
        where = _resolved(prefix)
        return answer(where, key(prefix=where, **inputs)), inputs
    except OSError:  # a path the system refuses (too long, a link loop): the full run says why
        return None, inputs


def remember(prefix: Path, inputs: dict, doc: dict) -> None:
    """Stamp what a re-run would print (the same environment, nothing changed, nothing fetched) when every file of
    the environment is there as its packages list it."""
    from lorastrap.install import prefix as pfx
    again = dict(doc, changed=False, downloaded_bytes=0, recovered=None, backup=None, verify=None,
                 verify_verdict="unchanged", timings={})
    broken, files = pfx.damage_manifest(prefix)
    if not broken:
        write(prefix, key(prefix=prefix, **inputs), again, [f[:2] for f in files])
