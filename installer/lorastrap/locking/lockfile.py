"""The lock file (conda-lock's unified format, version 1): written as conda-lock's own writer writes it, with its
content hash (condalock.py, without importing conda-lock: 0.6 s), so `conda-lock` judges its staleness as it
would its own; read without importing conda-lock:
``read_lock`` checks the fields it uses and names the file and the field when one is wrong; a copy rewritten with
other package URLs (what an engine or a bundle is handed)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from lorastrap.core import kept, paths, yamlio
from lorastrap.core.errors import ConfigError
from lorastrap.core.plain import Struct, struct
from lorastrap.locking.spec import inputs_sha256
from lorastrap.matrix.profiles import Profile


def _conda_lock_hashes(spec: Path, virtual_packages: Path, channels: list[str], platforms: list[str]) -> dict:
    """conda-lock's own content hash (imported here: 0.6 s) — for specs outside condalock's grammar."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification
    lock_spec = make_lock_spec(src_files=[spec], channel_overrides=channels, platform_overrides=platforms,
                               mapping_url=str(paths.ENVS / "pypi-to-conda.json"))
    return compute_content_hashes(lock_spec, virtual_package_repo_from_specification(virtual_packages))


def write(out: Path, *, spec: Path, virtual_packages: Path, channels: list[str], platforms: list[str],
           packages: list[dict], custom_metadata: dict[str, str]) -> dict[str, int]:
    """Write the lock as conda-lock's writer does, with its content hash (condalock.py; conda-lock itself only
    for a spec outside the grammar handled there).  Returns the packages it holds per platform (so nobody reads
    the lock just written again to count them).

    Platforms already in the output lock and not re-locked now are kept (if its channels are the same)."""
    from lorastrap.locking import condalock  # only when a lock is written
    from lorastrap.core.credentials import without_login
    # No user:password goes into a lock (it is shared and committed, like conda-lock's, whose locks hold a
    # credential only as an environment variable's name): the install gets them from the --channel/--mirror given
    # then (channels.logged_in) or from .netrc.
    channels = [without_login(c) for c in channels]
    entries = [condalock.package_entry(dict(p, url=without_login(p["url"]))) for p in packages]
    wanted = set(platforms)
    if out.exists() and not _nothing_to_keep(out, wanted, channels):
        try:
            old = read_lock(out)
        except ConfigError as exc:
            raise ConfigError(f"{out}: cannot be read to update it", why=exc.what,
                              fix="Delete it (or restore it from version control) and lock again.")
        if old.channels == channels:
            entries += [condalock.package_entry({**p, **(p.get("hash") or {})}) for p in old.raw["package"]
                        if p.get("platform") not in wanted]
            wanted |= set(old.platforms)
    all_platforms = sorted(wanted)
    hashes = (condalock.content_hashes(spec, virtual_packages, channels, all_platforms)
              or _conda_lock_hashes(spec, virtual_packages, channels, all_platforms))
    text = condalock.dump(out.name, content_hash=hashes, channels=channels, platforms=all_platforms,
                          sources=[os.path.relpath(spec, out.parent)], custom_metadata=custom_metadata,
                          packages=entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=out.parent)
    try:  # then an atomic rename into place
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    counts = dict.fromkeys(all_platforms, 0)
    for e in entries:
        counts[e["platform"]] = counts.get(e["platform"], 0) + 1
    return counts


def _nothing_to_keep(path: Path, platforms: set[str], channels: list[str]) -> bool:
    """Whether nothing of the lock at PATH would be kept — all its platforms are re-locked now, or it was locked
    from other CHANNELS — judged by its header alone (version and metadata come before the packages in
    conda-lock's format), so its packages need not be parsed.  False when unsure (the whole lock is read then)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            head = []
            for line in f:
                if line.startswith("package:"):
                    break
                head.append(line)
                if len(head) > 10_000:
                    return False
        meta = (yamlio.load("".join(head)) or {})["metadata"]
        old = [c.get("url") if isinstance(c, dict) else str(c) for c in meta["channels"]]
        return set(meta["platforms"]) <= platforms or old != channels
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@struct
class Entry(Struct):
    name: str
    version: str
    manager: str
    platform: str
    url: str
    sha256: str
    md5: str | None = None
    build: str | None = None
    dependencies: tuple[str, ...] = ()  # the names this package depends on (conda entries)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@struct
class Lock(Struct):
    path: Path
    raw: dict
    platforms: list[str]
    channels: list[str]
    entries: list[Entry]
    content_hash: dict[str, str]
    custom: dict[str, str]

    def for_platform(self, platform: str) -> list[Entry]:
        return [e for e in self.entries if e.platform == platform]

    def digest(self, platform: str) -> str:
        """Identity of what this lock installs on one platform (for no-op detection)."""
        h = hashlib.sha256()
        for e in sorted(self.for_platform(platform), key=lambda e: (e.manager, e.name)):
            h.update(f"{e.manager} {e.name} {e.version} {e.build} {e.sha256}\n".encode())
        return h.hexdigest()


def missing_dependencies(entries: list[Entry]) -> list[str]:
    """'pkg needs dep' for every dependency of a conda entry that no entry provides (virtual packages aside): a
    lock cut by hand, or made by a tool that dropped a package.  An engine would install it as it is."""
    names = {e.name for e in entries if e.manager == "conda"}
    return [f"{e.name} needs {dep}" for e in entries if e.manager == "conda" for dep in e.dependencies
            if not dep.startswith("__") and dep not in names]


def _bad(path: Path, field_name: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: field '{field_name}': {problem}", why="the lock file is malformed or was edited",
                       fix="Regenerate it with `lorastrap lock`, or restore it from version control.")


def _parsed(path: Path, keep: bool):
    """The lock's YAML, parsed — from what an earlier parse of the same bytes kept (core/kept.py: a lock of a few
    hundred packages takes ~35 ms to parse, the kept JSON ~2 ms).  KEEP (an install): keep this parse; a read-only
    command writes nothing.  One entry per lock file, replaced when its bytes change."""
    data = path.read_bytes()
    key = hashlib.sha256(data).hexdigest()
    name = "lock." + hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
    raw = kept.recall(name, key, "raw")
    if raw is not None:
        return raw
    import yaml
    try:
        raw = yamlio.load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", why=str(getattr(exc, "problem", exc)),
                          fix="Regenerate it with `lorastrap lock`.")
    if keep:
        kept.keep(name, key, "raw", raw)
    return raw


def read_lock(path: Path, *, keep: bool = False) -> Lock:
    """The lock at PATH, its fields checked.  keep: keep its parsed YAML for the next read (see _parsed)."""
    try:
        raw = _parsed(path, keep)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", fix="Run `lorastrap lock` to create it.")
    if not isinstance(raw, dict):
        raise _bad(path, "(top level)", "not a mapping")
    if raw.get("version") != 1:
        raise _bad(path, "version", f"expected 1 (conda-lock's unified format), found {raw.get('version')!r}")
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        raise _bad(path, "metadata", "missing")
    pkgs = raw.get("package")
    if not isinstance(pkgs, list):
        raise _bad(path, "package", "missing or not a list")
    entries = []
    for i, p in enumerate(pkgs):
        where = f"package[{i}]" + (f" ({p.get('name')})" if isinstance(p, dict) and p.get("name") else "")
        if not isinstance(p, dict):
            raise _bad(path, where, "not a mapping")
        for key in ("name", "version", "manager", "platform", "url"):
            if not isinstance(p.get(key), str) or not p.get(key):
                raise _bad(path, f"{where}.{key}", "missing")
        if p["manager"] not in ("conda", "pip"):
            raise _bad(path, f"{where}.manager", f"unknown manager {p['manager']!r} (expected conda or pip)")
        hashes = p.get("hash") or {}
        sha = hashes.get("sha256") if isinstance(hashes, dict) else None
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _bad(path, f"{where}.hash.sha256", "missing or not a sha256 (lorastrap checks every package)")
        entries.append(Entry(name=p["name"], version=str(p["version"]), manager=p["manager"], platform=p["platform"],
                             url=p["url"], sha256=sha, md5=hashes.get("md5"), build=p.get("build"),
                             dependencies=tuple(p.get("dependencies") or {}) if isinstance(
                                 p.get("dependencies") or {}, dict) else ()))
    channels = [c.get("url") if isinstance(c, dict) else str(c) for c in meta.get("channels") or []]
    return Lock(path=path, raw=raw, platforms=list(meta.get("platforms") or []), channels=channels,
                entries=entries, content_hash=dict(meta.get("content_hash") or {}),
                custom=dict(meta.get("custom_metadata") or {}))


def is_stale(lock_file: Lock, envs_dir: Path, profile: Profile) -> bool:
    return lock_file.custom.get("lorastrap_inputs_sha256") != inputs_sha256(envs_dir, profile)


def rewritten(lk: Lock, out: Path, url_for, *, platform: str | None = None, channels: list[str] | None = None,
              conda_only: bool = False) -> Path:
    """Write a copy of the lock whose package URLs are url_for(raw_entry) (for one platform, if given; conda_only:
    without the pip entries, every entry in the main category — what an engine is handed)."""
    raw = dict(lk.raw)
    raw["package"] = [dict(p, url=url_for(p), **({"category": "main"} if conda_only else {}))
                      for p in lk.raw["package"] if (platform is None or p["platform"] == platform)
                      and not (conda_only and p["manager"] != "conda")]
    meta = dict(raw["metadata"])
    if platform is not None:
        meta["platforms"] = [platform]
    if channels is not None:
        meta["channels"] = [{"url": c, "used_env_vars": []} for c in channels]
    raw["metadata"] = meta
    if conda_only:  # for an engine only: JSON, which is YAML too (its flow style), written ~20x faster
        import json
        try:
            out.write_text(json.dumps(raw))
            return out
        except (TypeError, ValueError):  # a value JSON has no type for (a YAML timestamp): YAML then
            pass
    import yaml
    out.write_text(yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))
    return out
