"""Step 3: a profile's spec + its virtual packages → a conda-lock file (unified format, version 1).

Solving is done by py-rattler (in rattler_worker, a child process) with the profile's own virtual packages — never
conda-lock's defaults, so a CPU lock cannot pull CUDA builds.  The file is written with conda-lock's own models and
writer, with conda-lock's own content hash, so `conda-lock` judges its staleness as it would its own.  `pip:`
entries are resolved by pip (`--dry-run --report`, no dependency resolution) and locked with their sha256.

Reading a lock (install, doctor) does not import conda-lock (0.4 s): ``read_lock`` checks the fields it uses and
names the file and the field when one is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from installer import paths, subproc
from installer.errors import ConfigError, NetworkError
from installer.profiles import Profile

DEFAULT_CHANNEL_ALIAS = "https://conda.anaconda.org"
DEFAULT_PIP_INDEX = "https://pypi.org/simple"
SOLVE_TIMEOUT_S = 900
PIP_TIMEOUT_S = 600

# conda platform → the wheel platform tags pip may take for it (pip matches each tag exactly).
WHEEL_PLATFORMS = {
    "linux-64": ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"],
    "linux-aarch64": ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                      "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"],
    "osx-arm64": ["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64"],
    "osx-64": ["macosx_13_0_x86_64", "macosx_12_0_x86_64", "macosx_11_0_x86_64", "macosx_10_15_x86_64",
               "macosx_10_13_x86_64", "macosx_10_9_x86_64"],
    "win-64": ["win_amd64"],
}


def lock_path(envs_dir: Path, profile: str) -> Path:
    """micromamba treats a file as a lock only if its name ends in -lock.yml: this one does."""
    return envs_dir / f"{profile}.conda-lock.yml"


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
    return Spec(path=path, channels=[str(c) for c in raw.get("channels") or ["conda-forge"]], conda=conda, pip=pip)


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

def _solve_error(answer: dict, channels: list[str], platform: str) -> Exception:
    text = answer.get("error", "")
    low = text.lower()
    if any(w in low for w in ("connect", "dns", "resolve", "timed out", "network", "404", "not found", "io error",
                              "failed to fetch", "no such file")):
        return NetworkError(f"could not read the channel(s) {', '.join(channels)} for {platform}",
                            why=text.splitlines()[0][:500],
                            fix="Check the network or proxy (https_proxy); use --mirror URL for a reachable mirror, "
                                "--channel for a local channel (file:// or a path), or an offline bundle "
                                "(--bundle, made with `python -m installer bundle` on a connected machine).")
    return ConfigError(f"the spec cannot be solved for {platform}", why=text.splitlines()[0][:800] if text else "",
                       fix="Relax the version pins in the spec, or check that the channel has these packages.")


def solve(spec: Spec, channels: list[str], platform: str, vps: dict[str, str], cache_dir: Path) -> list[dict]:
    answer = subproc.worker("rattler_worker", {
        "op": "solve", "channels": channels, "specs": spec.conda, "platform": platform,
        "virtual_packages": vps, "cache_dir": str(cache_dir / "repodata")}, timeout=SOLVE_TIMEOUT_S)
    if not answer.get("ok"):
        raise _solve_error(answer, channels, platform)
    return answer["records"]


def lock_pip(reqs: list[str], platform: str, python_version: str, index_url: str) -> list[dict]:
    """Resolve pip requirements to one wheel each (no dependency resolution), with url and sha256."""
    with tempfile.TemporaryDirectory(prefix="lorastrap-pip-") as tmp:
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--quiet",
                "--dry-run", "--ignore-installed", "--no-deps", "--only-binary=:all:", "--report", str(report),
                "--target", str(Path(tmp) / "target"), "--index-url", index_url,
                "--python-version", python_version, "--implementation", "cp"]
        for tag in WHEEL_PLATFORMS.get(platform, []):
            argv += ["--platform", tag]
        res = subproc.run(argv + reqs, timeout=PIP_TIMEOUT_S)
        if not res.ok:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
            raise NetworkError(f"pip could not resolve {', '.join(reqs)} for {platform} from {index_url}",
                               why=last[0], fix="Check the network or pass --pip-index-url for a reachable index.")
        items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        info = item["download_info"]
        sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        out.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                    "url": info["url"], "sha256": sha})
    return out


# --------------------------------------------------------------------------------------------------------------
# Writing, with conda-lock's models

def _python_version(records: list[dict]) -> str:
    py = next((r for r in records if r["name"] == "python"), None)
    if py is None:
        raise ConfigError("the spec has pip: entries but no python", fix="Add python to the spec's dependencies.")
    return ".".join(py["version"].split(".")[:2])


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
        records = solve(spec, urls, platform, vps, cache_dir)
        packages += [{"name": r["name"], "version": r["version"], "manager": "conda", "platform": platform,
                      "dependencies": dict(_split_dep(d) for d in r["depends"]), "url": r["url"],
                      "md5": r["md5"], "sha256": r["sha256"], "build": r["build"]} for r in records]
        if spec.pip:
            pyver = _python_version(records)
            narrate(f"resolving pip entries for {platform} (Python {pyver}): {', '.join(spec.pip)}")
            packages += [{"name": p["name"], "version": p["version"], "manager": "pip", "platform": platform,
                          "url": p["url"], "sha256": p["sha256"]}
                         for p in lock_pip(spec.pip, platform, pyver, pip_index_url)]
    request = {"spec": str(spec_path.absolute()), "virtual_packages": str((envs_dir / profile.virtual_packages).absolute()),
               "mapping_url": str(paths.ENVS / "pypi-to-conda.json"), "channels": urls, "platforms": platforms,
               "packages": packages, "output": str(out),
               "custom_metadata": {"lorastrap_profile": name,
                                   "lorastrap_inputs_sha256": inputs_sha256(envs_dir, profile)}}
    res = subproc.run([sys.executable, str(Path(__file__).with_name("condalock_writer.py"))],
                      timeout=300, stdin=json.dumps(request), env=subproc.clean_env(drop=("PYTHONPATH",)))
    if not res.ok:
        raise ConfigError(f"conda-lock could not write {out}", why=(res.stderr.strip().splitlines() or ["?"])[-1],
                          fix="Rerun with --debug; this is likely a bug in lorastrap.")
    return out


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


def _bad(path: Path, field_name: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: field '{field_name}': {problem}", why="the lock file is malformed or was edited",
                       fix="Regenerate it with `python -m installer lock`, or restore it from version control.")


def read_lock(path: Path) -> Lock:
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", fix="Run `python -m installer lock` to create it.")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", why=str(getattr(exc, "problem", exc)),
                          fix="Regenerate it with `python -m installer lock`.")
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
                             url=p["url"], sha256=sha, md5=hashes.get("md5"), build=p.get("build")))
    channels = [c.get("url") if isinstance(c, dict) else str(c) for c in meta.get("channels") or []]
    return Lock(path=path, raw=raw, platforms=list(meta.get("platforms") or []), channels=channels,
                entries=entries, content_hash=dict(meta.get("content_hash") or {}),
                custom=dict(meta.get("custom_metadata") or {}))


def is_stale(lock_file: Lock, envs_dir: Path, profile: Profile) -> bool:
    return lock_file.custom.get("lorastrap_inputs_sha256") != inputs_sha256(envs_dir, profile)


def mirrored(url: str, channels: list[str], mirror: str | None) -> str:
    """Rewrite a package URL of one of the lock's channels onto a mirror (same layout: CHANNEL/SUBDIR/FILE)."""
    if not mirror:
        return url
    for ch in sorted(channels, key=len, reverse=True):
        base = channel_url(ch)
        if url.startswith(base + "/"):
            return channel_url(mirror) + url[len(base):]
    return url


def rewritten(lk: Lock, out: Path, url_for, *, platform: str | None = None, channels: list[str] | None = None) -> Path:
    """Write a copy of the lock whose package URLs are url_for(raw_entry) (for one platform, if given)."""
    raw = dict(lk.raw)
    raw["package"] = [dict(p, url=url_for(p)) for p in lk.raw["package"]
                      if platform is None or p["platform"] == platform]
    meta = dict(raw["metadata"])
    if platform is not None:
        meta["platforms"] = [platform]
    if channels is not None:
        meta["channels"] = [{"url": c, "used_env_vars": []} for c in channels]
    raw["metadata"] = meta
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out
