"""The environments lorastrap manages, as a user sees them: `list` (with each one's health), `uninstall` and
`self uninstall`.  The registry and generations they read are install/generations.py's."""

from __future__ import annotations

import shutil
from pathlib import Path

from lorastrap.core import fsutil, locks, paths
from lorastrap.core.errors import LorastrapError, NoEnvError, NotOursError
from lorastrap.install import prefix as pfx, txn
from lorastrap.install.generations import (generations, managed, outgoing, recover_all, registered, swap_journal,
                                          tree_bytes, unregister)
from lorastrap.locking import lockfile

HEALTHY = "ok"

# --------------------------------------------------------------------------------------------------------------
# list

def health(prefix: Path) -> str:
    """A fast check: the environment is there, has its record and lock, and conda-meta/pip match the lock."""
    if not prefix.exists():
        return "missing"
    if not pfx.is_conda_env(prefix):
        return "not a conda environment"
    record = pfx.read_record(prefix)
    if record is None:
        return "no lorastrap record"
    try:
        entries = lockfile.read_lock(pfx.own_lock(prefix)).for_platform(record.platform)
    except LorastrapError as exc:
        return f"its lock cannot be read: {exc.what}"
    problems = pfx.mismatches(prefix, entries)
    if pfx.python_of(prefix) is None:
        problems.insert(0, "no python")
    if problems:
        return f"broken: {len(problems)} problem(s), e.g. {problems[0]} (`lorastrap doctor --prefix {prefix}`)"
    return HEALTHY


def describe(prefix: Path) -> dict:
    """One row of `list`."""
    name = prefix.name if prefix.parent == paths.envs_dir().absolute() else None
    row: dict = {"name": name, "prefix": str(prefix), "exists": prefix.exists(), "profile": None, "platform": None,
                 "lock_content_hash": None, "lock_digest": None, "packages": None, "bytes": None, "installed_at": None,
                 "verified": None, "health": health(prefix), "generations": []}
    record = pfx.read_record(prefix) if prefix.exists() else None
    if record:
        row.update(profile=record.profile, platform=record.platform, installed_at=record.installed_at,
                   lock_digest=record.lock_digest,
                   verified=(record.verify or {}).get("verdict") if record.verify else None)
        try:
            lk = lockfile.read_lock(pfx.own_lock(prefix))
            row["lock_content_hash"] = lk.content_hash.get(record.platform)
            entries = lk.for_platform(record.platform)
            row["packages"] = {"conda": sum(e.manager == "conda" for e in entries),
                               "pip": sum(e.manager == "pip" for e in entries)}
        except LorastrapError:
            pass
    if prefix.exists():
        row["bytes"] = tree_bytes(prefix)
    for g in generations(prefix):
        rec = pfx.read_record(g)
        row["generations"].append({"path": str(g), "bytes": tree_bytes(g),
                                   "profile": rec.profile if rec else None,
                                   "installed_at": rec.installed_at if rec else None,
                                   "lock_digest": rec.lock_digest if rec else None, "health": health(g)})
    return row


def list_all() -> list[dict]:
    return [describe(p) for p in managed()]


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def format_list(rows: list[dict]) -> str:
    if not rows:
        return f"no environments managed by lorastrap here (data dir {paths.data_dir()})"
    out = []
    for r in rows:
        pk = r["packages"] or {}
        out.append(f"{r['name'] or r['prefix']}" + (f"  ({r['prefix']})" if r["name"] else ""))
        out.append(f"  profile {r['profile'] or '-'} for {r['platform'] or '-'}, lock {(r['lock_digest'] or '-')[:12]}, "
                   f"{pk.get('conda', '-')} conda + {pk.get('pip', '-')} pip packages, {_mib(r['bytes'])}")
        out.append(f"  installed {r['installed_at'] or '-'}, verified: {r['verified'] or 'no'}, health: {r['health']}")
        gens = r["generations"]
        if gens:
            total = sum(g["bytes"] for g in gens)
            where = f"--name {r['name']}" if r["name"] else f"--prefix {r['prefix']}"
            out.append(f"  previous generations: {len(gens)} ({_mib(total)}); `lorastrap rollback {where}` makes "
                       "the first current")
            for g in gens:
                out.append(f"    {g['path']}: lock {(g['lock_digest'] or '-')[:12]}, installed "
                           f"{g['installed_at'] or '-'}, health: {g['health']}")
        else:
            out.append("  previous generations: none (`lorastrap update` keeps one)")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# uninstall

def _leftovers(prefix: Path) -> list[Path]:
    names = [txn.journal_path(prefix), swap_journal(prefix), outgoing(prefix)]
    return [p for p in names if p.exists()] + list(prefix.parent.glob(f"{prefix.name}.lorastrap-*trash-*"))


def uninstall(prefix: Path, *, wait: bool = True, confirm=None, narrate=lambda m: None) -> dict:
    """Remove PREFIX, its generations, its transaction files and its registry entry, under the prefix lock — only
    what lorastrap made (its record in conda-meta/lorastrap/).  A registered PREFIX that is no longer lorastrap's
    (the environment was removed long ago and the folder is the user's now) only loses its registry entry: nothing
    in it is deleted.  CONFIRM (when given) is asked before anything is removed; it raises to stop."""
    lock_file = txn.lock_file_path(prefix)
    known = prefix in registered()
    ours_gens = [g for g in generations(prefix) if pfx.made_by_lorastrap(g)]
    if not (prefix.exists() or ours_gens or known):
        raise NoEnvError(f"no environment at {prefix}", fix="`lorastrap list` shows the environments lorastrap manages.")
    if prefix.exists() and not pfx.made_by_lorastrap(prefix) and not txn.journal_path(prefix).exists():
        if known:
            narrate(f"{prefix} is registered but is not lorastrap's any more (no lorastrap record in conda-meta/): "
                    "dropping it from the registry, deleting nothing")
            unregister(prefix)
            return {"prefix": str(prefix), "removed_generations": 0, "freed_bytes": 0, "removed": False,
                    "dropped_from_registry": True}
        raise NotOursError(f"{prefix} was not installed by lorastrap (no lorastrap record in conda-meta/)",
                           why="uninstall removes only environments lorastrap made",
                           fix="Remove it yourself if you are sure (e.g. `rm -rf`), or pass another --prefix/--name.")
    if confirm is not None:
        confirm(f"this removes {prefix} and its {len(ours_gens)} previous generation(s)")
    with locks.held(lock_file, what=str(prefix), wait=wait, narrate=narrate):
        recover_all(prefix, narrate)
        mine = prefix.exists() and pfx.made_by_lorastrap(prefix)
        if prefix.exists() and not mine:
            narrate(f"{prefix} is not lorastrap's (no lorastrap record in conda-meta/): left as it is")
        gens = [g for g in generations(prefix) if pfx.made_by_lorastrap(g)]
        freed = (tree_bytes(prefix) if mine else 0) + sum(tree_bytes(g) for g in gens)
        for path in gens + _leftovers(prefix) + ([prefix] if mine else []):
            narrate(f"removing {path}")
            fsutil.remove_tree(path)
        lock_file.unlink(missing_ok=True)
    unregister(prefix)
    return {"prefix": str(prefix), "removed_generations": len(gens), "freed_bytes": freed, "removed": mine,
            "dropped_from_registry": known}


# --------------------------------------------------------------------------------------------------------------
# self uninstall

SETUP_RECORD = "shell-setup"  # what setup.sh made outside the data dir: "launcher|profile|created|dir PATH" lines
SETUP_MARKER = "# added by lorastrap setup.sh"


def setup_edits() -> list[tuple[str, Path]]:
    try:
        lines = (paths.data_dir() / SETUP_RECORD).read_text().splitlines()
    except OSError:
        return []
    return [(kind, Path(path)) for kind, _, path in (ln.partition(" ") for ln in lines) if path]


def holdings() -> dict:
    """What self uninstall would remove."""
    data = paths.data_dir()
    parts = {p.name: tree_bytes(p) for p in sorted(data.iterdir())} if data.is_dir() else {}
    return {"data_dir": str(data), "data_dir_bytes": sum(parts.values()), "parts": parts,
            "environments": [str(p) for p in managed()],
            "outside": [f"{kind} {path}" for kind, path in setup_edits() if kind != "dir"]}


def format_holdings(h: dict) -> str:
    lines = [f"the data dir {h['data_dir']} ({_mib(h['data_dir_bytes'])}):"]
    lines += [f"  {name:<22} {_mib(size)}" for name, size in h["parts"].items()]
    lines += [f"environment {p}" for p in h["environments"]]
    lines += [f"{entry}" for entry in h["outside"]]
    return "\n".join(lines)


def _strip_lines(path: Path, created: bool, narrate) -> None:
    data = str(paths.data_dir())
    try:
        text = path.read_text()
    except OSError:
        return
    kept = [ln for ln in text.splitlines(keepends=True) if not (SETUP_MARKER in ln and data in ln)]
    if kept == text.splitlines(keepends=True):
        return
    narrate(f"removing the PATH line from {path}")
    if created and not "".join(kept).strip():
        path.unlink()
    else:
        fsutil.write_atomic(path, "".join(kept))


def _remove_data_dir(data: Path, narrate) -> list[Path]:
    """Remove the data dir, except the folders under its envs/ that are not lorastrap's (a conda environment another
    tool made there, a folder of the user's): those stay, and the data dir with them.  Returns what stayed."""
    envs_dir = paths.envs_dir()
    kept = [p for p in envs_dir.iterdir() if not pfx.made_by_lorastrap(p) and not p.name.startswith(".")
            and ".lorastrap" not in p.name] if envs_dir.is_dir() and not envs_dir.is_symlink() else []
    narrate(f"removing {data}" + (f" (keeping {len(kept)} folder(s) lorastrap did not make)" if kept else ""))
    if not kept:
        shutil.rmtree(data)
        return []
    for part in data.iterdir():
        if part == envs_dir:
            for p in envs_dir.iterdir():
                if p not in kept:
                    fsutil.remove_tree(p)
        elif part.is_dir() and not part.is_symlink():
            shutil.rmtree(part)
        else:
            part.unlink()
    for p in kept:
        narrate(f"left {p}: lorastrap did not make it")
    return kept


def self_uninstall(*, narrate=lambda m: None) -> dict:
    """Remove every environment lorastrap manages, the launcher and PATH lines setup.sh added, and the data dir."""
    done = holdings()
    edits = setup_edits()
    for prefix in managed():
        if prefix.exists() or generations(prefix) or prefix in registered():
            try:
                uninstall(prefix, narrate=narrate)
            except (NotOursError, NoEnvError) as exc:
                narrate(f"left {prefix}: {exc.what}")
    for kind, path in edits:
        if kind == "dir":
            continue
        if kind == "launcher":
            try:
                ours = "lorastrap launcher" in path.read_text()
            except (OSError, UnicodeDecodeError):
                ours = False
            if ours:
                narrate(f"removing the launcher {path}")
                path.unlink()
        else:
            _strip_lines(path, kind == "created", narrate)
    data = paths.data_dir()
    if data.exists():
        kept = _remove_data_dir(data, narrate)
        if kept:
            done["kept"] = [str(p) for p in kept]
    for path in sorted((p for kind, p in edits if kind == "dir"), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()  # only the folders setup.sh created, and only if nothing else is in them now
        except OSError:
            pass
    return done
