"""Step 3: a profile's spec + its virtual packages → a conda-lock file (unified format, version 1).

Solving is done by py-rattler (in rattler_worker, a child process) with the profile's own virtual packages — never
conda-lock's defaults, so a CPU lock cannot pull CUDA builds.  The file is written with conda-lock's own models and
writer, with conda-lock's own content hash, so `conda-lock` judges its staleness as it would its own.  `pip:`
entries are resolved with their dependencies against the solved conda side (``pipside``) and locked with their
sha256.  A failed solve keeps the solver's whole explanation; ``explain_solve`` reads its leaves into the fix.

Reading a lock (install, doctor) does not import conda-lock (0.6 s): ``read_lock`` checks the fields it uses and
names the file and the field when one is wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorastrap.core import paths, subproc
from lorastrap.locking import pipside
from lorastrap.core.errors import ConfigError, NetworkError, UsageError
from lorastrap.matrix.profiles import Profile

DEFAULT_CHANNEL_ALIAS = "https://conda.anaconda.org"
DEFAULT_PIP_INDEX = "https://pypi.org/simple"
SOLVE_TIMEOUT_S = 900

# The CPU architecture in a conda platform's wheel tags.
WHEEL_ARCH = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le", "osx-64": "x86_64",
              "osx-arm64": "arm64"}
# PEP 600: the legacy manylinux names are aliases of manylinux_2_5, _2_12 and _2_17.
LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}


def _major_minor(value: str, what: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)(?:\.(\d+))?", value)
    if not m:
        raise ConfigError(f"virtual package {what}={value!r} is not a version", fix=f"Give {what} as MAJOR.MINOR.")
    return int(m.group(1)), int(m.group(2) or 0)


def wheel_platforms(platform: str, vps: dict[str, str]) -> list[str]:
    """The wheel platform tags a machine admitted by these virtual packages can install (pip matches each exactly).

    Linux: manylinux_2_N for every N up to the profile's __glibc (and their legacy aliases); macOS: macosx_M_0 up to
    the profile's __osx.  A wheel that needs more than the profile's minimum is not one it may lock."""
    arch = WHEEL_ARCH.get(platform)
    if arch is None:
        raise ConfigError(f"no wheel tags for platform {platform}", fix="Lock pip: entries for a supported platform.")
    if platform.startswith("linux"):
        if "__glibc" not in vps:
            raise ConfigError(f"the virtual packages for {platform} have no __glibc",
                              why="the manylinux tags of pip: wheels derive from the profile's glibc minimum",
                              fix="Add __glibc to the profile's virtual-packages file.")
        major, minor = _major_minor(vps["__glibc"], "__glibc")
        tags = []
        for n in range(minor if major == 2 else 0, 4, -1):
            tags.append(f"manylinux_2_{n}_{arch}")
            if n in LEGACY_MANYLINUX:
                tags.append(f"{LEGACY_MANYLINUX[n]}_{arch}")
        return tags + [f"linux_{arch}"]
    if "__osx" not in vps:
        raise ConfigError(f"the virtual packages for {platform} have no __osx",
                          why="the macosx tags of pip: wheels derive from the profile's macOS minimum",
                          fix="Add __osx to the profile's virtual-packages file.")
    major, minor = _major_minor(vps["__osx"], "__osx")
    tags = [f"macosx_{m}_0_{arch}" for m in range(major, 10, -1)]
    if arch == "x86_64":
        tags += [f"macosx_10_{m}_{arch}" for m in range(minor if major == 10 else 15, 8, -1)]
    return tags


def lock_path(envs_dir: Path, profile: str) -> Path:
    """micromamba treats a file as a lock only if its name ends in -lock.yml: this one does."""
    return envs_dir / f"{profile}.conda-lock.yml"


CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/label/[A-Za-z0-9_.-]+)?$")


def check_source(value: str, flag: str, *, index: bool = False) -> str:
    """A --channel / --mirror (a conda channel: http(s) or file URL, a folder, or a name) or --pip-index-url
    (index=True: an http(s) or file URL) as given by a user; refused with what / why / fix when it is none."""
    fix = (f"Give {flag} an http(s):// or file:// URL" + ("" if index else ", a folder that exists, or a channel "
           "name such as conda-forge") + ".")
    text = value.strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(\S*)$", text)
    if match:
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme in ("http", "https") and rest and not rest.startswith("/") or scheme == "file" and rest:
            return text
        raise UsageError(f"{flag} {value!r} is not a usable URL",
                         why="only http://, https:// (with a host) and file:// are supported", fix=fix)
    if not index and text and ("/" in text or text.startswith(".")):
        if Path(text).expanduser().is_dir():
            return text
        raise UsageError(f"{flag} {value!r}: no such folder", why="a path must name the channel's folder", fix=fix)
    if not index and CHANNEL_NAME.match(text):
        return text
    raise UsageError(f"{flag} {value!r} is not a channel URL, folder or name" if not index else
                     f"{flag} {value!r} is not a URL", why="it would silently become a channel nobody meant", fix=fix)


def channel_url(channel: str) -> str:
    """'conda-forge' → https://conda.anaconda.org/conda-forge; URLs (http, https, file) and paths pass through."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
        return channel.rstrip("/")
    if channel.startswith("/") or channel.startswith("."):
        return Path(channel).resolve().as_uri()
    return f"{DEFAULT_CHANNEL_ALIAS}/{channel}"


# --------------------------------------------------------------------------------------------------------------
# The spec

@dataclass
class Spec:
    path: Path
    channels: list[str]
    conda: list[str]
    pip: list[str] = field(default_factory=list)
    pip_dependencies: str = "lock"  # or "conda": every dependency of a pip entry must come from the conda side


def read_spec(path: Path) -> Spec:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", fix="Restore the profile's spec or correct profiles.yaml.")
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML", why=str(exc), fix="Fix the YAML syntax.")
    if not isinstance(raw, dict) or not isinstance(raw.get("dependencies"), list):
        raise ConfigError(f"{path}: field 'dependencies' is missing or not a list",
                          fix="A spec is an environment.yml: channels: [...] and dependencies: [...].")
    conda, pip = [], []
    for i, dep in enumerate(raw["dependencies"]):
        if isinstance(dep, str):
            conda.append(dep)
        elif isinstance(dep, dict) and set(dep) == {"pip"} and isinstance(dep["pip"], list):
            pip += [str(p) for p in dep["pip"]]
        else:
            raise ConfigError(f"{path}: field 'dependencies[{i}]' is neither a spec string nor a pip: list")
    policy = str(raw.get("pip-dependencies", "lock"))
    if policy not in pipside.POLICIES:
        raise ConfigError(f"{path}: field 'pip-dependencies' is {policy!r}",
                          fix="Use `lock` (dependencies the conda side lacks are locked from PyPI) or `conda` "
                              "(they must be on the conda side).")
    return Spec(path=path, channels=[str(c) for c in raw.get("channels") or ["conda-forge"]], conda=conda, pip=pip,
                pip_dependencies=policy)


def inputs_sha256(envs_dir: Path, profile: Profile) -> str:
    """A cheap staleness key: the bytes of the spec and of the virtual-packages file."""
    h = hashlib.sha256()
    for name in (profile.spec, profile.virtual_packages):
        h.update((envs_dir / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def virtual_packages(envs_dir: Path, profile: Profile, platform: str) -> dict[str, str]:
    path = envs_dir / profile.virtual_packages
    try:
        raw = yaml.safe_load(path.read_text())
        return {str(k): str(v) for k, v in raw["subdirs"][platform]["packages"].items()}
    except KeyError:
        raise ConfigError(f"{path}: no 'subdirs.{platform}.packages'",
                          why=f"the profile is locked for {platform} with the virtual packages listed there",
                          fix=f"Add a subdirs: {platform}: packages: block, or lock for one of the listed platforms.")
    except (yaml.YAMLError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a virtual-packages file", why=str(exc),
                          fix="Use conda-lock's format: subdirs: PLATFORM: packages: {__cuda: '12.0', ...}")


# --------------------------------------------------------------------------------------------------------------
# Solving

VP_FACTS = {"__cuda": ("the driver's CUDA version", "driver_cuda_min"), "__glibc": ("glibc", "glibc_min"),
            "__osx": ("the macOS version", None), "__linux": ("the Linux kernel", None),
            "__cuda_arch": ("the GPU compute capability", "compute_capability")}
LEAF_RE = re.compile(r"(?:─\s*|^\s*|: )(?P<name>[A-Za-z0-9_.\-]+)(?: (?P<spec>[^\n]*?))?, for which no candidates "
                     r"were found", re.M)


def explain_solve(text: str, vps: dict[str, str], vps_file: Path) -> str:
    """The fix for a solver explanation, from its leaves: a virtual package the profile lacks or sets too low, a
    package the channel lacks, or (only then) pins in conflict."""
    fixes, others = [], []
    for m in LEAF_RE.finditer(text):
        name, spec = m.group("name"), (m.group("spec") or "").strip()
        if name.startswith("__"):
            fact, rule = VP_FACTS.get(name, (f"the machine's {name}", None))
            rule_txt = f" and requires.{rule} in profiles.yaml, with its source" if rule else ""
            if name not in vps:
                fixes.append(f"a package needs {name}{' ' + spec if spec else ''} ({fact}) and the profile's virtual "
                             f"packages ({vps_file}) have none: if the profile is meant for such machines add {name} "
                             f"there{rule_txt}; otherwise pin builds that do not need it")
            else:
                fixes.append(f"a package needs {name} {spec} ({fact}) but the profile sets {name}={vps[name]} in "
                             f"{vps_file}: raise it to the minimum needed{rule_txt} (plan then refuses older "
                             "machines), or pin an older build that fits")
        else:
            others.append(f"no {name}{' ' + spec if spec else ''} fits (the channel lacks it or another pin excludes "
                          f"it): check the spec's line for {name} and that the channel (or mirror) carries it")
    for m in re.finditer(r"No candidates were found for (?P<name>\S+)(?: (?P<spec>[^\n]*?))?\.?$", text, re.M):
        others.append(f"the channel has no {m.group('name')} matching {m.group('spec') or '*'}: check the spec's line "
                      f"for {m.group('name')} against what the channel (or mirror) carries")
    seen = []
    for f in fixes or others:  # a virtual package the profile lacks explains the rest of the tree
        if f not in seen:
            seen.append(f)
    if seen:
        return "; ".join(seen) + "."
    return ("The solver's explanation above names the spec lines in conflict: change the pins it names "
            "(or check that the channel has these packages).")


def _solve_error(answer: dict, channels: list[str], platform: str, vps: dict[str, str], vps_file: Path) -> Exception:
    text = answer.get("error", "")
    low = text.lower()
    explained = "cannot be installed" in low or "for which no candidates were found" in low or "cannot solve" in low
    if not explained and any(w in low for w in ("connect", "dns", "resolve", "timed out", "network", "404",
                                                "not found", "io error", "failed to fetch", "no such file")):
        return NetworkError(f"could not read the channel(s) {', '.join(channels)} for {platform}",
                            why=text.splitlines()[0][:500],
                            fix="Check the network or proxy (https_proxy); use --mirror URL for a reachable mirror, "
                                "--channel for a local channel (file:// or a path), or an offline bundle "
                                "(--bundle, made with `lorastrap bundle` on a connected machine).")
    return ConfigError(f"the spec cannot be solved for {platform} with "
                       f"{', '.join(f'{k}={v}' for k, v in vps.items())}", why=text.strip(),
                       fix=explain_solve(text, vps, vps_file))


def solve(spec: Spec, channels: list[str], platform: str, vps: dict[str, str], cache_dir: Path,
          vps_file: Path = Path("virtual-packages.yml")) -> list[dict]:
    answer = subproc.worker("locking.rattler_worker", {
        "op": "solve", "channels": channels, "specs": spec.conda, "platform": platform,
        "virtual_packages": vps, "cache_dir": str(cache_dir / "repodata")}, timeout=SOLVE_TIMEOUT_S)
    if not answer.get("ok"):
        raise _solve_error(answer, channels, platform, vps, vps_file)
    return answer["records"]


# --------------------------------------------------------------------------------------------------------------
# Writing, with conda-lock's models

def _python_version(records: list[dict]) -> str:
    py = next((r for r in records if r["name"] == "python"), None)
    if py is None:
        raise ConfigError("the spec has pip: entries but no python", fix="Add python to the spec's dependencies.")
    return py["version"]


def _split_dep(dep: str) -> tuple[str, str]:
    name, _, rest = dep.partition(" ")
    return name, rest.strip() or "*"


def lock(*, envs_dir: Path, name: str, profile: Profile, platforms: list[str] | None = None,
         channels: list[str] | None = None, out: Path | None = None, cache_dir: Path | None = None,
         pip_index_url: str = DEFAULT_PIP_INDEX, narrate=lambda msg: None) -> Path:
    """Solve the profile for each platform and write (or update) its lock file.  Returns the lock's path."""
    spec_path = envs_dir / profile.spec
    spec = read_spec(spec_path)
    platforms = platforms or list(profile.platforms)
    bad = [p for p in platforms if p not in profile.platforms]
    if bad:
        raise ConfigError(f"profile {name!r} is not for {', '.join(bad)}",
                          fix=f"Lock for one of {', '.join(profile.platforms)} (profiles.yaml lists them).")
    urls = [channel_url(c) for c in (channels or spec.channels)]
    cache_dir = cache_dir or paths.cache_dir()
    out = (out or lock_path(envs_dir, name)).absolute()

    packages: list[dict] = []
    for platform in platforms:
        vps = virtual_packages(envs_dir, profile, platform)
        narrate(f"solving {name} for {platform} with {', '.join(f'{k}={v}' for k, v in vps.items())}")
        records = solve(spec, urls, platform, vps, cache_dir, envs_dir / profile.virtual_packages)
        packages += [{"name": r["name"], "version": r["version"], "manager": "conda", "platform": platform,
                      "dependencies": dict(_split_dep(d) for d in r["depends"]), "url": r["url"],
                      "md5": r["md5"], "sha256": r["sha256"], "build": r["build"]} for r in records]
        if spec.pip:
            ctx = pipside.Context(platform=platform, python=_python_version(records),
                                  wheel_platforms=wheel_platforms(platform, vps), policy=spec.pip_dependencies,
                                  vps_file=envs_dir / profile.virtual_packages, spec_file=spec_path)
            narrate(f"resolving pip entries for {platform} (Python {ctx.python}) against the conda side: "
                    f"{', '.join(spec.pip)}")
            packages += [{"name": p["name"], "version": p["version"], "manager": "pip", "platform": platform,
                          "url": p["url"], "sha256": p["sha256"]}
                         for p in pipside.resolve(spec.pip, records, ctx, pip_index_url, cache_dir)]
    _write(out, spec=spec_path.absolute(), virtual_packages=(envs_dir / profile.virtual_packages).absolute(),
           channels=urls, platforms=platforms, packages=packages,
           custom_metadata={"lorastrap_profile": name, "lorastrap_inputs_sha256": inputs_sha256(envs_dir, profile)})
    return out


def _write(out: Path, *, spec: Path, virtual_packages: Path, channels: list[str], platforms: list[str],
           packages: list[dict], custom_metadata: dict[str, str]) -> None:
    """Write the lock with conda-lock's own models, writer and content hash (imported here: 0.6 s).

    Platforms already in the output lock and not re-locked now are kept (if its channels are the same)."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.lockfile import parse_conda_lock_file, write_conda_lock_file
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency, Lockfile, LockMeta
    from conda_lock.models.channel import Channel
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification

    deps = [LockedDependency(
        name=p["name"], version=p["version"], manager=p["manager"], platform=p["platform"],
        dependencies=p.get("dependencies", {}), url=p["url"],
        hash=HashModel(md5=p.get("md5"), sha256=p["sha256"]), categories={"main"}, build=p.get("build"))
        for p in packages]
    wanted = set(platforms)
    if out.exists():
        try:
            old = parse_conda_lock_file(out)
        except Exception as exc:  # conda-lock raises pydantic and YAML errors alike
            raise ConfigError(f"{out}: cannot be read to update it", why=str(exc).splitlines()[0],
                              fix="Delete it (or restore it from version control) and lock again.")
        if [c.url for c in old.metadata.channels] == channels:
            deps += [p for p in old.package if p.platform not in wanted]
            wanted |= set(old.metadata.platforms)
    all_platforms = sorted(wanted)
    lock_spec = make_lock_spec(src_files=[spec], channel_overrides=channels, platform_overrides=all_platforms,
                               mapping_url=str(paths.ENVS / "pypi-to-conda.json"))
    meta = LockMeta(content_hash=compute_content_hashes(lock_spec, virtual_package_repo_from_specification(virtual_packages)),
                    channels=[Channel.from_string(u) for u in channels], platforms=all_platforms,
                    sources=[os.path.relpath(spec, out.parent)], custom_metadata=custom_metadata)
    lockfile = Lockfile(package=deps, metadata=meta)
    lockfile.toposort_inplace()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".lock-", dir=out.parent))
    try:  # the same name (the writer's help text quotes it), then an atomic rename into place
        write_conda_lock_file(lockfile, tmpdir / out.name, metadata_choices=set())
        os.replace(tmpdir / out.name, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Reading (fast, strict where it matters)

@dataclass
class Entry:
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


@dataclass
class Lock:
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


def read_lock(path: Path) -> Lock:
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", fix="Run `lorastrap lock` to create it.")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", why=str(getattr(exc, "problem", exc)),
                          fix="Regenerate it with `lorastrap lock`.")
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


def mirrored(url: str, channels: list[str], mirror: str | dict[str, str] | None) -> str:
    """Rewrite a package URL of one of the lock's channels onto a mirror (same layout: CHANNEL/SUBDIR/FILE).
    MIRROR: one URL (for every channel: a lock of one channel), or {channel: URL} (--mirror CHANNEL=URL, like
    pixi's [mirrors]; a channel given by name or URL), which rewrites only the channels it names."""
    if not mirror:
        return url
    for ch in sorted(channels, key=len, reverse=True):
        base = channel_url(ch)
        if url.startswith(base + "/"):
            if isinstance(mirror, str):
                return channel_url(mirror) + url[len(base):]
            target = next((m for k, m in mirror.items() if channel_url(k) == base), None)
            return channel_url(target) + url[len(base):] if target else url
    return url


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
    out.write_text(yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))
    return out


# --------------------------------------------------------------------------------------------------------------
# Which lock an install uses

def choose(*, envs_dir: Path, name: str, profile: Profile, platform: str, frozen: bool,
           channels: list[str] | None, pip_index_url: str, narrate) -> Lock:
    """The profile's committed lock when it covers this platform and is current; else one locked here earlier
    for the same inputs and channels; else lock now (unless frozen) into the data dir."""
    committed = lock_path(envs_dir, name)
    local = paths.data_dir() / "locks" / f"{name}.{platform}.conda-lock.yml"
    reason = f"{committed.name} does not exist"
    if committed.exists():
        lk = read_lock(committed)
        if platform not in lk.platforms:
            reason = f"{committed.name} has no {platform} section"
        elif is_stale(lk, envs_dir, profile):
            reason = f"{committed.name} is stale (its spec or virtual packages changed since it was written)"
        else:
            return lk
    if not frozen and local.exists():  # locked on an earlier run here, for the same spec and channels
        lk = read_lock(local)
        wanted = [channel_url(c) for c in channels] if channels else None
        if not is_stale(lk, envs_dir, profile) and (wanted is None or lk.channels == wanted):
            return lk
    if frozen:
        raise ConfigError(f"no usable lock for profile {name} on {platform}: {reason}",
                          why="--frozen installs only from committed locks",
                          fix=f"Run `lorastrap lock --profile {name} --platform {platform}` and commit the lock, "
                              f"or drop --frozen.")
    narrate(f"{reason}: locking {name} for {platform} now")
    if local.exists():
        local.unlink()  # stale or for other channels: start afresh
    lock(envs_dir=envs_dir, name=name, profile=profile, platforms=[platform], channels=channels, out=local,
         pip_index_url=pip_index_url, narrate=narrate)
    return read_lock(local)


# --------------------------------------------------------------------------------------------------------------
# What changed between two locks (the refresh workflow's summary)

def diff_locks(old: Lock | None, new: Lock) -> dict[str, dict[str, list]]:
    """Per platform: packages added, removed and changed (version or build), by (manager, name)."""
    out = {}
    for platform in sorted(set(new.platforms) | set(old.platforms if old else [])):
        before = {(e.manager, e.name): e for e in (old.for_platform(platform) if old else [])}
        after = {(e.manager, e.name): e for e in new.for_platform(platform)}
        out[platform] = {
            "added": [{"name": k[1], "manager": k[0], "version": after[k].version} for k in sorted(after.keys() - before.keys())],
            "removed": [{"name": k[1], "manager": k[0], "version": before[k].version} for k in sorted(before.keys() - after.keys())],
            "changed": [{"name": k[1], "manager": k[0], "from": f"{before[k].version} {before[k].build or ''}".strip(),
                         "to": f"{after[k].version} {after[k].build or ''}".strip()}
                        for k in sorted(before.keys() & after.keys())
                        if (before[k].version, before[k].build, before[k].sha256) != (after[k].version, after[k].build, after[k].sha256)]}
    return out


def format_diff(diff: dict[str, dict[str, list]]) -> str:
    lines = []
    for platform, d in diff.items():
        if not any(d.values()):
            lines.append(f"{platform}: no change")
            continue
        lines.append(f"{platform}: {len(d['added'])} added, {len(d['removed'])} removed, {len(d['changed'])} changed")
        lines += [f"  + {p['name']} {p['version']}" + (" (pip)" if p["manager"] == "pip" else "") for p in d["added"]]
        lines += [f"  - {p['name']} {p['version']}" + (" (pip)" if p["manager"] == "pip" else "") for p in d["removed"]]
        lines += [f"  ~ {p['name']} {p['from']} -> {p['to']}" + (" (pip)" if p["manager"] == "pip" else "")
                  for p in d["changed"]]
    return "\n".join(lines)
