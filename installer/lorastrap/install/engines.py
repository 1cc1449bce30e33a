"""The engines that link a locked environment: micromamba / mamba when one is found, else the embedded py-rattler;
and the pip step (uv, else pip) for a lock's pip entries.

Each engine gets the same hand-over (``hand_over``): a lock holding only the conda entries, whose URLs name the
archives lorastrap already checked (cache.py), laid out as a channel (``pkgs/channel/SUBDIR/FILE``, symbolic links) —
micromamba 1.5 rebuilds every URL of a lock as CHANNEL/SUBDIR/FILENAME, so a bare cache path does not do. The pip
entries are installed by lorastrap itself from wheels it checked too, so no engine runs a pip step of its own.

micromamba / mamba run isolated from the user's configuration: a root prefix and package cache of lorastrap's own
(one per release: caches of different releases are not mixed), ``--no-rc``, CONDARC, MAMBARC, CONDA_* and MAMBA_*
variables dropped (micromamba 1.5 stops on CONDARC with --no-rc: "Incompatible configuration") and
HOME pointed at that root (so no ~/.mambarc is read and no ~/.conda/environments.txt written). Their version is
read first and judged against envs/engines.yaml (known-bad releases, each with its source).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lorastrap.core import locks, paths, subproc, yamlio
from lorastrap.install import ahead
from lorastrap.core.errors import ConfigError, DiskError, LorastrapError, UsageError
from lorastrap.core.plain import Struct, frozen_struct, struct

ENGINE_TIMEOUT_S = 3600
VERSION_TIMEOUT_S = 30
FACTS = "engines.yaml"


@struct
class Engine(Struct):
    kind: str  # "micromamba", "mamba" or "rattler"
    exe: str | None = None
    version: str | None = None

    def describe(self) -> str:
        """Which engine and which release ran: every report carries this."""
        if self.kind == "rattler":
            return f"embedded py-rattler {self.version or _rattler_version()}"
        return f"{self.kind} {self.version or '?'} ({self.exe})"


def _rattler_version() -> str:
    """py-rattler's release, from its dist-info folder beside the package (the folder's name says it: PEP 427) —
    without importing py-rattler (the worker does that) or importlib.metadata (~6 ms with the email parser it pulls
    in), which is asked only when that folder is not found as expected."""
    from importlib import util
    try:
        spec = util.find_spec("rattler")
        site = Path(spec.origin).parent.parent if spec and spec.origin else None
        found = [d.name for d in site.iterdir() if d.name.startswith("py_rattler-")] if site else []
        named = [m.group(1) for n in found if (m := re.fullmatch(r"py_rattler-(\d[\w.+!]*)\.dist-info", n))]
        if len(named) == 1:
            return named[0]
    except (OSError, ValueError, ImportError):
        pass
    from importlib import metadata
    try:
        return metadata.version("py-rattler")
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------------------------
# Which releases lorastrap hands a lock to (envs/engines.yaml)

@frozen_struct
class Minimum(Struct):
    version: str
    why: str
    source: str


@frozen_struct
class Refused(Struct):
    start: str  # "from" in the file
    end: str  # "to"
    why: str
    source: str


@frozen_struct
class Facts(Struct):
    minimum: dict[str, Minimum]
    refused: list[Refused]
    tested: dict[str, list[str]] = None  # kind → releases `auto` may pick


def facts(envs_dir: Path | None = None) -> Facts:
    """envs/engines.yaml, checked (plain dataclasses: this is read on every install, so no model classes to build)."""
    import yaml
    path = (envs_dir or paths.ENVS) / FACTS
    try:
        raw = yamlio.load(path.read_text())
        if raw.get("schema_version") != 1 or set(raw) - {"schema_version", "minimum", "refused", "tested"}:
            raise ValueError("expected the keys schema_version (1), tested, minimum and refused")
        tested = {str(kind): [str(v) for v in versions] for kind, versions in (raw.get("tested") or {}).items()}
        minimum = {kind: Minimum(**m) for kind, m in (raw.get("minimum") or {}).items()}
        refused = [Refused(start=r["from"], end=r["to"], why=r["why"], source=r["source"])
                   for r in raw.get("refused") or []]
        for v in [m.version for m in minimum.values()] + [x for r in refused for x in (r.start, r.end)]:
            if not re.fullmatch(r"\d+\.\d+\.\d+", str(v)):
                raise ValueError(f"{v!r} is not a version such as 2.3.2")
        if any(set(r) - {"from", "to", "why", "source"} for r in raw.get("refused") or []):
            raise ValueError("a refused range has a key other than from, to, why, source")
        for v in [x for versions in tested.values() for x in versions]:
            if not re.fullmatch(r"\d+\.\d+\.\d+", v):
                raise ValueError(f"tested: {v!r} is not a version such as 1.5.12")
        return Facts(minimum=minimum, refused=refused, tested=tested)
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a valid list of engine releases", why=str(exc).splitlines()[0],
                          fix="Restore envs/engines.yaml from version control.")


def judge(kind: str, version: str, known: Facts) -> str | None:
    """Why this release may not install a lock (with the source), or None when it may."""
    from lorastrap.core import versions  # here, not at the top: an install imports this module before it detects
    v = versions.pypi(version)  # releases are dotted numbers (read_version, facts): 2.0 is 2.0.0
    low = known.minimum.get(kind)
    if low and v < versions.pypi(low.version):
        return f"{kind} {version} is older than {low.version}: {low.why} (source: {low.source})"
    for r in known.refused:
        if versions.pypi(r.start) <= v <= versions.pypi(r.end):
            return f"{kind} {version} is a known-bad release ({r.start}–{r.end}): {r.why} (source: {r.source})"
    return None


def read_version(exe: str) -> str | None:
    """`EXE --version`: micromamba and mamba 2 print the bare version; mamba 1 prints `mamba X` then `conda Y`."""
    res = subproc.run([exe, "--version"], timeout=VERSION_TIMEOUT_S, env=_isolated_env(None))
    m = re.search(r"\d+\.\d+(?:\.\d+)?", res.stdout or "")
    return m.group(0) if res.ok and m else None


# --------------------------------------------------------------------------------------------------------------
# Finding one

CHOICES = ("auto", "micromamba", "mamba", "rattler")


def find(choice: str | None = None, *, narrate=lambda m: None, envs_dir: Path | None = None) -> Engine:
    """The engine to use (choice None: $LORASTRAP_ENGINE, else auto). auto: the first usable micromamba/mamba
    (MAMBA_EXE, PATH without shims, the data dir's bin/), else the embedded engine — a refused or broken one is
    skipped with a word why. micromamba / mamba: that one, or a UsageError saying why not."""
    choice = choice or os.environ.get("LORASTRAP_ENGINE") or "auto"
    if choice not in CHOICES:
        raise UsageError(f"LORASTRAP_ENGINE={choice!r} is not an engine", why=f"expected one of {', '.join(CHOICES)}",
                         fix="Set LORASTRAP_ENGINE to one of those, or unset it.")
    if choice == "rattler":
        return Engine("rattler")
    exe = os.environ.get("MAMBA_EXE")
    if exe and choice in ("auto", "micromamba", "mamba") and not (Path(exe).is_file() and os.access(exe, os.X_OK)):
        raise UsageError(f"MAMBA_EXE={exe!r} is not an executable file",
                         why="not an executable file: it " + ("does not exist" if not os.path.lexists(exe) else
                                                              "is a folder" if Path(exe).is_dir() else
                                                              "cannot be executed"),
                         fix="Point MAMBA_EXE at a micromamba/mamba executable, or unset it (lorastrap then "
                             "uses one on PATH or its embedded engine).")
    found = ahead.candidates(choice)
    known = facts(envs_dir) if found else None  # envs/engines.yaml judges what was found (none: not read at all)
    reasons = []
    for kind, exe, where in found:
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            reasons.append(f"{exe} ({where}) is not an executable file")
            continue
        version = read_version(exe)
        if version is None:
            reasons.append(f"{exe} ({where}) did not answer `--version`")
            continue
        bad = judge(kind, version, known)
        if bad:
            reasons.append(f"{exe} ({where}): {bad}")
            continue
        if choice == "auto" and version not in (known.tested or {}).get(kind, []):
            reasons.append(f"{exe} ({where}): {kind} {version} is not a release lorastrap is tested with "
                           f"(envs/engines.yaml lists {', '.join((known.tested or {}).get(kind, [])) or 'none'}; "
                           f"--engine {kind} uses it anyway)")
            continue
        for reason in reasons:
            narrate(f"not using {reason}")
        return Engine(kind, exe, version)
    if choice == "auto":
        for reason in reasons:
            narrate(f"not using {reason}; the embedded engine installs instead")
        return Engine("rattler")
    raise UsageError(f"--engine {choice}: no usable {choice} found",
                     why="; ".join(reasons) or "looked at MAMBA_EXE, PATH (without shims) and the data dir's bin/",
                     fix=f"Install a {choice} release that envs/engines.yaml does not refuse, set MAMBA_EXE to it, "
                         f"or use --engine rattler (the embedded engine).")


# --------------------------------------------------------------------------------------------------------------
# The hand-over and the link step

def hand_over(lk, platform: str, archives: dict[str, Path], channel: Path, work: Path) -> Path:
    """A lock (written into work) of the conda entries only, whose URLs are CHANNEL/SUBDIR/FILE: symbolic links to
    the checked archives (not hard links: a new hard link moves the archive's ctime, and the cache would hash it
    again on the next run, see cache.py). CHANNEL stays the same from run to run,
    so an engine's own cache recognises a package it extracted before. The lock's name ends in -lock.yml
    (micromamba reads a file as a lock only then, mamba#3039) and every entry is in the `main` category (the only
    one micromamba installs without --category, mamba#1917)."""
    from lorastrap.locking import lockfile
    urls: dict[str, str] = {}
    for e in lk.for_platform(platform):
        if e.manager != "conda":
            continue
        target = channel / e.url.rsplit("/", 2)[-2] / e.filename
        src = archives[e.name]
        if not (target.is_symlink() and os.readlink(target) == str(src)):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            os.symlink(src, tmp)
            os.replace(tmp, target)
        urls[e.name] = target.as_uri()
    return lockfile.rewritten(lk, work / f"{platform}-lock.yml", lambda p: urls[p["name"]], platform=platform,
                             channels=[channel.as_uri()], conda_only=True)


class EngineError(LorastrapError):
    pass


def engine_root(engine: Engine, cache_dir: Path) -> Path:
    """micromamba/mamba's own root prefix and package cache: one per kind and release, beside cache_dir."""
    return cache_dir.parent / "mamba" / f"{engine.kind}-{engine.version or 'unknown'}"


def engine_cache_held(engine: Engine, cache_dir: Path, *, wait: bool = True, narrate=lambda m: None):
    """micromamba/mamba's package cache, held: micromamba 1.5 run concurrently on one package cache fails ("Package
    cache error"), and a copy it is unpacking looks damaged to a check from outside (a missing info/index.json) — so
    its runs, and lorastrap's checks of its unpacked copies, go one at a time per cache (installers on one node, or
    nodes sharing LORASTRAP_PKGS_DIR).  The embedded engine's cache needs no such lock: a nullcontext."""
    from contextlib import nullcontext
    if engine.kind == "rattler":
        return nullcontext()
    root = engine_root(engine, cache_dir)
    return locks.held(root / ".lorastrap.lock", what=f"{engine.kind}'s package cache {root}", wait=wait,
                      narrate=narrate)


def _isolated_env(root: Path | None) -> dict[str, str]:
    extra = {"MAMBA_ROOT_PREFIX": str(root), "CONDA_PKGS_DIRS": str(root / "pkgs"), "HOME": str(root)} if root else {}
    return subproc.clean_env(drop=("CONDARC", "MAMBARC"), prefixes=("CONDA_", "MAMBA_"), **extra)


def mamba_command(engine: Engine, prefix: Path, lock_file: Path, root: Path) -> tuple[list[str], dict[str, str]]:
    """`create` from a conda-lock file, isolated from the user's configuration.

    micromamba 1.5 (run by the tests): as below. mamba / micromamba 2.x: the same flags per their documentation
    (mamba.readthedocs.io, "micromamba create -f env-lock.yml"; --no-rc, --root-prefix, CONDA_PKGS_DIRS) — not run
    here, no 2.x binary being at hand."""
    if not lock_file.name.endswith(("-lock.yml", "-lock.yaml")):
        raise ValueError(f"{lock_file.name}: micromamba treats a file as a lock only if it ends in -lock.yml")
    argv = [engine.exe or engine.kind, "create", "--yes", "--no-rc", "--root-prefix", str(root),
            "--prefix", str(prefix), "--file", str(lock_file)]
    return argv, _isolated_env(root)


def link(engine: Engine, *, prefix: Path, lock_file: Path, platform: str, cache_dir: Path,
         narrate=lambda m: None) -> frozenset:
    """Create the environment at prefix from the hand-over lock_file.  Raises EngineError on failure.  Returns
    the packages (dist names) the worker unpacked into CACHE_DIR ahead of the link in this run (ahead.unpack)."""
    if engine.kind == "rattler":
        def fresh() -> subproc.Worker:
            return subproc.Worker("locking.rattler_worker", show_progress=sys.stderr.isatty())
        request = {"op": "install", "lock": str(lock_file), "platform": platform, "prefix": str(prefix),
                   "cache_dir": str(cache_dir)}
        # The big archives unpacked ahead, each in a thread of its own — waited for before the worker started ahead
        # is taken: interrupted here, that one is still the install's to let go (cli/install.py's discard).
        big = ahead.collect(timeout=ENGINE_TIMEOUT_S)
        started_ahead = ahead.take()
        if any(how == "ok" for how in big.values()):
            narrate(f"unpacked ahead, each in a thread of its own: "
                    f"{', '.join(sorted(d for d, how in big.items() if how == 'ok'))}")
        answer = (started_ahead or fresh()).ask(request, timeout=ENGINE_TIMEOUT_S)
        if started_ahead is not None and answer.get("unanswered") and not os.path.lexists(prefix):
            # The worker started ahead ended (killed, or crashed unpacking ahead) before it began to link: that was
            # a speed-up only; a fresh worker links, unpacking what it needs itself.
            narrate(f"the engine's worker started ahead ended before linking ({answer.get('error', '')[:200]}); "
                    "linking with a fresh one")
            answer = fresh().ask(request, timeout=ENGINE_TIMEOUT_S)
        if not answer.get("ok"):
            _raise_if_disk_full(answer.get("error", ""), prefix)
            raise EngineError(f"the embedded engine could not create {prefix}", why=answer.get("error", "")[:800],
                              fix="Rerun with --debug; if it persists, try --engine micromamba.")
        unpacked = {**big, **(answer.get("extracted") or {})}
        failed = {dist: why for dist, why in unpacked.items() if why not in ("ok", "present", "left")}
        if failed:
            narrate(f"unpacked at the link step instead of ahead: {', '.join(sorted(failed))} "
                    f"({next(iter(failed.values()))[:200]})")
        return frozenset(dist for dist, how in unpacked.items() if how == "ok")
    root = engine_root(engine, cache_dir)
    (root / "pkgs").mkdir(parents=True, exist_ok=True)
    argv, env = mamba_command(engine, prefix, lock_file, root)
    with engine_cache_held(engine, cache_dir, narrate=narrate):
        res = subproc.run(argv, timeout=ENGINE_TIMEOUT_S, env=env)
    if not res.ok:
        _raise_if_disk_full(res.stdout + res.stderr, prefix)
        raise EngineError(f"{engine.describe()} could not create {prefix}", why=res.tail(),
                          fix="See the message above; rerun with --engine rattler to use the embedded engine.")
    return frozenset()


DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _raise_if_disk_full(text: str, prefix: Path) -> None:
    """An engine that failed because the disk (or its inodes, or the quota) ran out: say so, not "try another
    engine"."""
    if any(s in text for s in DISK_FULL):
        raise DiskError(f"the disk filled up while linking {prefix}", why=text.strip().splitlines()[-1][:300],
                        fix="Free disk space (or inodes: `df -i`) where the environment goes; the previous "
                            "environment was restored.")


# --------------------------------------------------------------------------------------------------------------
# The pip step

def pip_command(python: Path, wheels: list[tuple[str, Path, str]], req: Path, uv_cache: Path) -> list[str]:
    """The pip step's command: uv when there is one, else pip. Either installs exactly the given wheel files
    (already checked against the lock's sha256), hashes required again, no dependencies, no index. uv keeps its
    cache (unpacked wheels, interpreter facts) in lorastrap's cache and copies files out of it (no shared inodes)."""
    req.write_text("".join(f"{name} @ {w.as_uri()} --hash=sha256:{sha}\n" for name, w, sha in wheels))
    from lorastrap.locking import uvexe
    uv = uvexe.find()
    if uv:
        return [uv, "pip", "install", "--python", str(python), "--no-deps", "--require-hashes", "--offline",
                "--no-config", "--cache-dir", str(uv_cache), "--link-mode", "copy", "--quiet", "-r", str(req)]
    return [sys.executable, "-m", "pip", "--python", str(python), "install", "--isolated", "--no-deps",
            "--require-hashes", "--no-index", "--no-input", "--disable-pip-version-check",
            "--no-warn-script-location", "-r", str(req)]


def pip_install(prefix: Path, wheels: list[tuple[str, Path, str]], work: Path, *, uv_cache: Path,
                timeout: float = 1800) -> str:
    """Install checked wheel files (name, path, sha256) into the environment. Returns the installer's name."""
    from lorastrap.install import prefix as pfx
    python = pfx.python_of(prefix) or prefix / "bin" / "python"
    argv = pip_command(python, wheels, work / "pip-requirements.txt", uv_cache)
    # Offline (--offline / --no-index): no TLS, so no certificate settings either — uv loads every file of an
    # SSL_CERT_DIR at start-up even then (~290 on Debian's /etc/ssl/certs: ~6 ms of a warm install's ~25 ms step).
    env = subproc.clean_env(drop=("SSL_CERT_DIR", "SSL_CERT_FILE"), prefixes=("PIP_", "UV_"))
    stray = prefix / ".lock"  # uv locks the environment with PREFIX/.lock and leaves it: not the user's file
    had_stray = stray.exists()
    res = subproc.run(argv, timeout=timeout, env=env, cwd=work)  # uv refuses a current folder that was removed
    if not had_stray and stray.is_file():
        stray.unlink()
    if not res.ok:
        _raise_if_disk_full(res.stdout + res.stderr, prefix)
        raise EngineError("the lock's pip entries could not be installed", why=res.tail(),
                          fix="The wheels were checked against the lock; rerun with --debug and report it.")
    return "uv" if "uv" in Path(argv[0]).name else "pip"
