"""What is in a prefix (a conda environment or a virtualenv): its conda-meta records, its Python distributions,
its Python, lorastrap's record of it; and running a command inside it, activated.

Read-only, except ``write_record``.  install, doctor and verify all look at environments through this module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

from lorastrap.core import fsutil, subproc
from lorastrap.core.plain import Struct, struct

if TYPE_CHECKING:
    from lorastrap.core.records import EnvRecord

RECORD_DIR = Path("conda-meta") / "lorastrap"  # the environment's record and the lock it was built from


# --------------------------------------------------------------------------------------------------------------
# conda-meta

@struct
class CondaRecord(Struct):
    file: str  # conda-meta/<file>
    name: str
    version: str
    build: str | None
    sha256: str | None
    paths: list[dict]  # paths_data.paths entries ({"_path", "path_type", "sha256", "sha256_in_prefix", ...})


@struct
class CondaMeta(Struct):
    records: dict[str, CondaRecord] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # file name → why it cannot be read


def is_conda_env(prefix: Path) -> bool:
    return (prefix / "conda-meta").is_dir()


def conda_meta(prefix: Path) -> CondaMeta:
    """Every conda-meta/*.json record of PREFIX; the ones that cannot be read are listed with the reason."""
    out = CondaMeta()
    for f in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
            name = rec["name"]
            paths = rec["paths_data"]["paths"] if "paths_data" in rec else [{"_path": p} for p in rec["files"]]
            if not isinstance(name, str) or not isinstance(paths, list):
                raise TypeError("name or paths of the wrong type")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            out.broken[f.name] = f"{type(exc).__name__}: {exc}"
            continue
        out.records[name] = CondaRecord(file=f.name, name=name, version=str(rec.get("version")),
                                        build=rec.get("build"), sha256=rec.get("sha256"), paths=paths)
    return out


# --------------------------------------------------------------------------------------------------------------
# Python

def python_of(prefix: Path) -> Path | None:
    """The environment's Python: bin/python (conda env, venv), python.exe or Scripts/python.exe (Windows layouts)."""
    for candidate in (prefix / "bin" / "python", prefix / "python.exe", prefix / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return None


def site_packages(prefix: Path) -> Path | None:
    found = sorted((prefix / "lib").glob("python3*/site-packages")) if (prefix / "lib").is_dir() else []
    if not found and (prefix / "Lib" / "site-packages").is_dir():
        found = [prefix / "Lib" / "site-packages"]
    return found[-1] if found else None


@struct
class Distribution(Struct):
    name: str  # canonical (PEP 503)
    version: str
    installer: str  # what wrote it: "pip", "conda", "uv", … ("" when unknown)
    files: list[str]  # relative to the prefix


def distributions(prefix: Path) -> dict[str, Distribution]:
    """The Python distributions installed in PREFIX, by canonical name (read with importlib.metadata)."""
    sp = site_packages(prefix)
    if sp is None:
        return {}
    from importlib import metadata

    from packaging.utils import canonicalize_name
    out = {}
    for dist in metadata.distributions(path=[str(sp)]):
        raw_name = dist.metadata["Name"] if dist.metadata else None
        if not raw_name:
            continue
        files = [os.path.relpath(os.path.normpath(sp / str(f)), prefix) for f in (dist.files or [])]
        out[canonicalize_name(raw_name)] = Distribution(name=canonicalize_name(raw_name), version=dist.version,
                                                        installer=(dist.read_text("INSTALLER") or "").strip(),
                                                        files=files)
    return out


def unowned(prefix: Path, owned: set[str]) -> list[str]:
    """What in the prefix no path of OWNED names (conda-meta and compiled files aside): the user's — files, links
    (to files or folders: a link is listed, never followed), FIFOs and other special files, and empty folders."""
    out = []
    for root, dirs, files in os.walk(prefix):
        rel_root = os.path.relpath(root, prefix)
        if rel_root == "conda-meta" or rel_root.startswith("conda-meta" + os.sep):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]  # os.walk does not enter them
        if rel_root != "." and not dirs and not files:
            rel = os.path.normpath(rel_root)
            if rel not in owned:
                out.append(rel)  # an empty folder
        for f in files + links:
            rel = os.path.normpath(os.path.join(rel_root, f))
            if rel in owned or f.endswith(".pyc") or rel == "CACHEDIR.TAG":
                continue
            out.append(rel)
    return sorted(out)


def owned_paths(prefix: Path) -> set[str]:
    """Every path a conda package or a Python distribution of PREFIX owns."""
    owned = {p["_path"] for rec in conda_meta(prefix).records.values() for p in rec.paths}
    for dist in distributions(prefix).values():
        owned.update(dist.files)
    return owned


def user_files(prefix: Path) -> list[str]:
    """The files no conda package and no Python distribution owns: what install and repair carry over."""
    return unowned(prefix, owned_paths(prefix))


# --------------------------------------------------------------------------------------------------------------
# Compared with a lock

def _dist_info_present(sp: Path | None, name: str, version: str) -> bool:
    """Whether site-packages SP has NAME's VERSION recorded as the packaging specs name its folder
    ("Recording installed projects": {name}-{version}.dist-info, the name normalized as PEP 503 says, then - as _)
    with its METADATA: what pip and uv write.  A quick answer for a pip entry just installed; False sends the
    caller to ``distributions`` (importlib.metadata, ~14 ms of imports), which decides."""
    import re
    stem = re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")
    return sp is not None and (sp / f"{stem}-{version}.dist-info" / "METADATA").is_file()


def mismatches(prefix: Path, entries: list) -> list[str]:
    """What in PREFIX differs from the lock's entries (lock.Entry); empty: the environment is what the lock says."""
    meta = conda_meta(prefix).records
    pip = [e for e in entries if e.manager == "pip"]
    sp = site_packages(prefix) if pip else None
    dists = None if all(_dist_info_present(sp, e.name, e.version) for e in pip) else distributions(prefix)
    problems = []
    for e in entries:
        if e.manager == "conda":
            rec = meta.get(e.name)
            if rec is None:
                problems.append(f"{e.name}: not in conda-meta")
            elif rec.sha256 != e.sha256 or rec.version != e.version:
                problems.append(f"{e.name}: conda-meta has {rec.version} sha256 {rec.sha256}, "
                                f"the lock {e.version} sha256 {e.sha256}")
        elif dists is not None:  # the quick look did not find every pip entry: importlib.metadata decides
            from packaging.utils import canonicalize_name
            dist = dists.get(canonicalize_name(e.name))
            if dist is None or dist.version != e.version:
                problems.append(f"{e.name} (pip): not installed at {e.version}")
    return problems


def damage_manifest(prefix: Path) -> tuple[list[str], list[list]]:
    """What the damage check looks at: (conda-meta records that cannot be read, [[path relative to PREFIX, size it
    must have or -1 (only present), owner], ...]): every path of every conda-meta record (its size where no prefix
    was written into it: conda-meta gives the package's size) and every file a pip-installed distribution's RECORD
    lists with a size.  The quick no-op (noop.py) keeps it, so that it checks without reading conda-meta."""
    meta = conda_meta(prefix)
    broken = [f"conda-meta/{name}: unreadable ({why})" for name, why in meta.broken.items()]
    files = []
    for rec in meta.records.values():
        for p in rec.paths:
            rel = p.get("_path")
            if not isinstance(rel, str) or p.get("path_type") == "directory":
                continue
            rewritten = p.get("sha256_in_prefix") not in (None, p.get("sha256")) or "prefix_placeholder" in p
            size = p.get("size_in_bytes")
            sized = p.get("path_type") in (None, "hardlink") and not rewritten and isinstance(size, int)
            files.append([rel, size if sized else -1, rec.name])
    sp = site_packages(prefix)
    for project, installer, recorded in _recorded(sp) if sp else []:
        if installer == "conda":
            continue  # conda-meta has its files (its RECORD was written before the prefix was)
        for rel, size in recorded:
            if not rel.endswith(".pyc"):
                files.append([os.path.relpath(os.path.normpath(sp / rel), prefix), size, f"{project} (pip)"])
    return broken, files


def _recorded(sp: Path) -> list[tuple[str, str, list[tuple[str, int]]]]:
    """(project, installer, [(path relative to SP, size), ...]) for each *.dist-info folder of SP with a RECORD:
    that file is CSV rows of path, hash, size (the "Recording installed projects" specification), INSTALLER names
    who wrote it.  Rows without a size are left out (RECORD itself).  Read with csv alone: importlib.metadata
    costs ~14 ms of imports (email, socket) on every install that remembers its result."""
    import csv
    out = []
    try:
        folders = sorted(d for d in os.listdir(sp) if d.endswith(".dist-info"))
    except OSError:
        return []
    for folder in folders:
        try:
            with open(sp / folder / "RECORD", newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if len(r) >= 3 and r[2].strip().isdigit()]
            installer = (sp / folder / "INSTALLER").read_text(encoding="utf-8").strip() \
                if (sp / folder / "INSTALLER").is_file() else ""
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        out.append((folder[:-len(".dist-info")].split("-")[0], installer, [(r[0], int(r[2])) for r in rows]))
    return out


def damaged_files(prefix: Path, manifest: tuple[list[str], list[list]] | None = None) -> list[str]:
    """Files of PREFIX's packages that are missing or changed in size, cheaply (one lstat each, no hashing; see
    damage_manifest).  Empty: the files are all there."""
    broken, files = manifest or damage_manifest(prefix)
    out = list(broken)
    for rel, size, owner in files:
        where = os.path.join(prefix, rel)
        try:
            st = os.lstat(where)
        except OSError:
            out.append(f"{rel} ({owner}): missing")
            continue
        if size >= 0 and st.st_size != size and os.path.isfile(where):
            out.append(f"{rel} ({owner}): {st.st_size} bytes, its package has {size}")
    return sorted(set(out))


# --------------------------------------------------------------------------------------------------------------
# lorastrap's record

def read_record(prefix: Path) -> EnvRecord | None:
    from lorastrap.core.records import EnvRecord
    try:
        return EnvRecord.model_validate_json((prefix / RECORD_DIR / "record.json").read_text())
    except (OSError, ValueError):  # ValueError: also pydantic's ValidationError (not valid, or not JSON)
        return None


def made_by_lorastrap(prefix: Path) -> bool:
    """Whether PREFIX holds lorastrap's record of it (conda-meta/lorastrap/record.json): what lorastrap may
    replace or delete without being told to."""
    return (prefix / RECORD_DIR / "record.json").is_file() and not (prefix / RECORD_DIR).is_symlink()


def own_lock(prefix: Path) -> Path:
    """The copy of the lock the environment was built from."""
    return prefix / RECORD_DIR / "conda-lock.yml"


def write_record(prefix: Path, record: EnvRecord, lock_file: Path) -> None:
    d = prefix / RECORD_DIR
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lock_file, own_lock(prefix))
    fsutil.write_atomic(d / "record.json", record.model_dump_json(indent=2) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------------------------
# Running a command inside

def env_in(prefix: Path, driver_cuda: str | None = None) -> dict[str, str]:
    """The environment a command inside PREFIX runs with: activated PATH, no outside Python or conda leaking in."""
    env = subproc.clean_env(drop=("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LORASTRAP_DRIVER_CUDA"),
                            prefixes=("CONDA_",), CONDA_PREFIX=str(prefix), HF_HUB_OFFLINE="1")
    if driver_cuda:
        env["LORASTRAP_DRIVER_CUDA"] = driver_cuda
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_in(prefix: Path, argv: list[str], *, timeout: float, driver_cuda: str | None = None) -> subproc.Result:
    """Run ARGV inside PREFIX (its first word resolved in PREFIX/bin when it is there)."""
    exe = prefix / "bin" / argv[0]
    argv = [str(exe)] + argv[1:] if exe.exists() else argv
    return subproc.run(argv, timeout=timeout, env=env_in(prefix, driver_cuda), cwd=prefix)
