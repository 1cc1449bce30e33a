"""conda-lock's lock file and content hash, written without importing conda-lock (its import alone takes 0.6–1 s,
longer than the rest of `lorastrap lock`).

``content_hashes`` reproduces conda-lock 4's ``compute_content_hashes(make_lock_spec(...), virtual_package_repo_
from_specification(...))`` (conda_lock/content_hash.py: the JSON of the channels, the spec's dependencies sorted by
manager and name, and the virtual packages' fake repodata, sha256 per platform) for the spec lines lorastrap's
profiles use: ``name``, ``name VERSION``, ``name VERSION BUILD`` with plain version clauses, and pip lines
``name==X`` (or another single clause).  Anything else (selectors, channel::name, brackets, markers, URLs, channel
URLs with credentials or tokens, a virtual package with a build string) returns None, and the caller asks
conda-lock itself.  ``dump`` writes what conda-lock's ``write_conda_lock_file`` writes: its help text, then the
v1 document (packages sorted by manager, name, platform; each package's dependencies sorted).
tests/test_lock.py compares both against conda-lock's own code.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from lorastrap.core import yamlio

_NAME = r"[a-z0-9][a-z0-9_.\-]*"
_CLAUSE = r"(?:>=|<=|<|>|!=)?[0-9][0-9a-z_.]*(?:\.\*)?"
_CONDA_LINE = re.compile(rf"^(?P<name>{_NAME})(?: (?P<version>{_CLAUSE}(?:,{_CLAUSE})*)(?: (?P<build>[a-z0-9_.*]+))?)?$")
_PIP_LINE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9\-]*)(?P<version>(?:==|>=|<=|!=|~=|<|>)[0-9][0-9a-z.]*)?$")
_PLAIN_URL = re.compile(r"^(?:file|https?)://[^@$\s]+$")
_VP_VERSION = re.compile(r"^[0-9a-z][0-9a-z._]*$")
VP_TIMESTAMP = 1577854800000  # conda-lock's fixed timestamp for its fake virtual-package repodata


def _spec_entry(name: str, version: str, manager: str, build: str | None = None) -> dict:
    return {"name": name, "manager": manager, "category": "main", "extras": [], "version": version, "build": build,
            "conda_channel": None, "hash": None}


def _specs(raw: dict, text: str) -> list[dict] | None:
    """The spec's dependencies as conda-lock serialises them for the hash, or None when a line is outside the
    grammar handled here."""
    if any("#" in line and "[" in line.split("#", 1)[1] for line in text.splitlines()):
        return None  # a platform selector, or a comment that conda-lock might read as one
    if set(raw) - {"name", "channels", "dependencies", "pip-dependencies", "platforms"}:
        return None  # category, pip-repositories, allow-pypi-requests, …: conda-lock's extensions
    deps: dict[tuple[str, str], dict] = {}
    for dep in raw.get("dependencies") or []:
        if isinstance(dep, str):
            m = _CONDA_LINE.match(dep.strip()) if dep == dep.strip() else None
            if m is None:
                return None
            deps[("conda", m["name"])] = _spec_entry(m["name"], m["version"] or "", "conda", m["build"])
        elif isinstance(dep, dict) and set(dep) == {"pip"} and isinstance(dep["pip"], list):
            for line in dep["pip"]:
                m = _PIP_LINE.match(line) if isinstance(line, str) else None
                if m is None:
                    return None
                deps[("pip", m["name"])] = _spec_entry(m["name"], m["version"] or "*", "pip")
            deps[("conda", "pip")] = _spec_entry("pip", "*", "conda")  # conda-lock adds pip to the conda side
        else:
            return None
    return sorted(deps.values(), key=lambda d: (d["manager"], d["name"]))


def _virtual_repodata(raw: dict, platform: str) -> dict | None:
    try:
        packages = raw["subdirs"][platform]["packages"]
    except (KeyError, TypeError):
        return None
    if not isinstance(packages, dict) or set(raw) != {"subdirs"}:
        return None
    out = {}
    for name, version in packages.items():
        version = str(version)
        if not isinstance(name, str) or not name.startswith("__") or not _VP_VERSION.match(version):
            return None
        out[f"{name}-{version}-0.tar.bz2"] = {
            "name": name, "version": version, "build_string": "", "build_number": 0, "noarch": "", "depends": [],
            "timestamp": VP_TIMESTAMP, "package_type": "virtual_system", "build": "0", "subdir": platform}
    return {"noarch": {"info": {"subdir": "noarch"}, "packages": {}},
            platform: {"info": {"subdir": platform}, "packages": out}}


def content_hashes(spec: Path, virtual_packages: Path, channels: list[str], platforms: list[str]) -> dict | None:
    """conda-lock's content hash for each platform, or None when conda-lock must compute it."""
    text = spec.read_text()
    raw, vps = yamlio.load(text), yamlio.load(virtual_packages.read_text())
    if not isinstance(raw, dict) or not isinstance(vps, dict) or not all(_PLAIN_URL.match(c) for c in channels):
        return None
    specs = _specs(raw, text)
    if specs is None:
        return None
    chans = [json.dumps({"url": c, "used_env_vars": []}, separators=(",", ":")) for c in channels]
    out = {}
    for platform in platforms:
        vpr = _virtual_repodata(vps, platform)
        if vpr is None:
            return None
        content = {"channels": chans, "specs": specs, "virtual_package_hash": vpr}
        out[platform] = hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()
    return out


def _help(name: str, sources: list[str]) -> str:
    lines = [
        "This lock file was generated by conda-lock (https://github.com/conda/conda-lock). DO NOT EDIT!",
        "",
        "A \"lock file\" contains a concrete list of package versions (with checksums) to be installed. Unlike",
        "e.g. `conda env create`, the resulting environment will not change as new package versions become",
        "available, unless you explicitly update the lock file.",
        "",
        "Install this environment as \"YOURENV\" with:",
        f"    conda-lock install -n YOURENV {name}",
        "To update a single package to the latest version compatible with the version constraints in the source:",
        f"    conda-lock lock  --lockfile {name} --update PACKAGE",
        "To re-solve the entire environment, e.g. after changing a version constraint in the source file:",
        f"    conda-lock {' '.join('-f ' + s for s in sources)} --lockfile {name}",
    ]
    return "".join(("# " + line).rstrip() + "\n" for line in lines)


def package_entry(p: dict) -> dict:
    """A package as conda-lock's v1 model writes it (field order of its model; None fields left out)."""
    out = {"name": p["name"], "version": p["version"], "manager": p["manager"], "platform": p["platform"],
           "dependencies": dict(sorted((p.get("dependencies") or {}).items())), "url": p["url"],
           "hash": {k: v for k, v in (("md5", p.get("md5")), ("sha256", p["sha256"])) if v is not None}}
    if p.get("build") is not None:
        out["build"] = p["build"]
    out["category"] = "main"
    out["optional"] = False
    return out


def dump(name: str, *, content_hash: dict[str, str], channels: list[str], platforms: list[str], sources: list[str],
         custom_metadata: dict[str, str], packages: list[dict]) -> str:
    """The text conda-lock's writer gives for these packages (entries made by ``package_entry``)."""
    doc = {"version": 1,
           "metadata": {"content_hash": content_hash,
                        "channels": [{"url": c, "used_env_vars": []} for c in channels],
                        "platforms": platforms, "sources": sources, "custom_metadata": custom_metadata},
           "package": sorted((p for p in packages if not (p["manager"] == "conda" and p["name"].startswith("__"))),
                             key=lambda p: (p["manager"], p["name"], p["platform"]))}
    return _help(name, sources) + yaml.dump(doc, Dumper=getattr(yaml, "CDumper", yaml.Dumper), sort_keys=False)
