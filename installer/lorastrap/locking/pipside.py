"""Step 3b: a spec's `pip:` entries resolved with their dependencies, counting the conda side as installed.

conda-lock and pixi resolve pip dependencies with the solved conda packages counted as installed; this does the
same with uv (``uv pip compile``): every solved conda package is offered to uv as a metadata-only stand-in wheel
``NAME-VERSION+conda`` (conda names mapped to PyPI names with the envs dir's ``pypi-to-conda.json`` (names.py), else normalised) and
pinned to it by a constraint, so uv only adds what the conda side lacks.  What it adds is either locked as a pip
entry (``pip-dependencies: lock``, the default) or, where the spec says ``pip-dependencies: conda``, refused with
the requirement, the entry that needs it and the conda spec line to add.

uv resolves for a platform a little wider than the profile admits (uv knows manylinux_2_17 and 2_28, not 2_24);
the files are then chosen here, from the index itself, with the profile's own tags (``wheels.wheel_platforms``):
a wheel the profile's oldest machine cannot install fails the lock with the minimum it needs.  An unpinned entry
whose newest release has no usable wheel fails too: it would otherwise be silently downgraded.
"""

from __future__ import annotations

import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from lorastrap.core import subproc
from lorastrap.core.credentials import shown
from lorastrap.core.errors import ConfigError, NetworkError
from lorastrap.core.plain import Struct, struct
from lorastrap.locking import names, pypi_index, uvexe, wheels
from lorastrap.machine import platforms

UV_TIMEOUT_S = 600
# The manylinux levels uv can target (uv pip compile --python-platform); resolution uses the lowest >= 2.28 that
# covers the profile's glibc, the profile's own minimum is then enforced on the chosen files.
UV_MANYLINUX = (28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
UV_MACOS_TARGET = "15.0"


# --------------------------------------------------------------------------------------------------------------
# Resolution

@struct
class Context(Struct):
    """What the pip side is resolved for: the profile's platform, virtual packages and Python."""
    platform: str
    python: str  # full version of the solved python, e.g. 3.12.12
    wheel_platforms: list[str]  # wheels.wheel_platforms(platform, vps)
    vps_file: Path
    spec_file: Path
    policy: str = "lock"
    envs_dir: Path | None = None  # whose pypi-to-conda.json names the conda side's packages

    @property
    def pyver(self) -> str:
        return ".".join(self.python.split(".")[:2])


def _stub_wheel(folder: Path, name: str, version: str) -> None:
    """A metadata-only wheel standing for a conda package (uv reads its METADATA; it is never installed)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: lorastrap\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def _uv_platform(ctx: Context) -> tuple[str, dict[str, str]]:
    known = platforms.get(ctx.platform)
    arch = known.uv_arch if known else None
    if arch is None:
        raise ConfigError(f"pip: entries cannot be locked for {ctx.platform}", fix="Lock them for linux or osx.")
    if ctx.platform.startswith("osx"):
        return f"{arch}-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": UV_MACOS_TARGET}
    glibc = max((int(t.split("_")[2]) for t in ctx.wheel_platforms if t.startswith("manylinux_2_")), default=17)
    level = next((n for n in UV_MANYLINUX if n >= glibc), UV_MANYLINUX[-1])
    return f"{arch}-manylinux_2_{level}", {}


def _parse_compiled(text: str) -> list[tuple[str, str, list[str]]]:
    """`uv pip compile --annotation-style line` output → [(name, version, via)]."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)(?:\s+#\s*via\s+(.*))?$", line.strip())
        if m:
            via = [v.strip() for v in (m.group(3) or "").split(",") if v.strip() and not v.strip().startswith("-r ")]
            out.append((canonicalize_name(m.group(1)), m.group(2), via))
    return out


def _conda_provided(records: list[dict], reverse: names.NameMap) -> dict[str, tuple[str, str]]:
    """PyPI name → (conda name, version) for every solved conda package with a PEP 440 version."""
    out = {}
    for r in records:
        try:
            v = Version(r["version"])
        except InvalidVersion:
            continue
        if v.local is None:
            out[reverse.pypi(r["name"])] = (r["name"], str(v))
    return out


def resolve(reqs: list[str], records: list[dict], ctx: Context, index_url: str, cache_dir: Path) -> list[dict]:
    """The pip entries and the dependencies the conda side lacks, each as one wheel with url and sha256."""
    reverse = names.load(ctx.envs_dir)
    provided = _conda_provided(records, reverse)
    requested = {}
    for r in reqs:
        try:
            requested[canonicalize_name(Requirement(r).name)] = Requirement(r)
        except InvalidRequirement as exc:
            raise ConfigError(f"{ctx.spec_file}: pip entry {r!r} is not a requirement", why=str(exc),
                              fix="Write pip entries as PEP 508 requirements, e.g. bitsandbytes==0.50.2.")
    for name in requested:
        if name in provided:
            cname, ver = provided[name]
            raise ConfigError(f"{ctx.spec_file}: {name} is both a pip entry and on the conda side ({cname} {ver})",
                              why="pip would install over the conda package's files",
                              fix=f"Keep {name} on one side only (remove the pip entry or the conda spec {cname}).")
    uv_platform, env_extra = _uv_platform(ctx)
    with tempfile.TemporaryDirectory(prefix="lorastrap-pipside-") as tmp:
        t = Path(tmp)
        (t / "stubs").mkdir()
        for name, (_, ver) in provided.items():
            _stub_wheel(t / "stubs", name, f"{ver}+conda")
        (t / "constraints.txt").write_text("".join(f"{n}=={v}+conda\n" for n, (_, v) in sorted(provided.items())))
        (t / "requirements.in").write_text("".join(f"{r}\n" for r in reqs))
        # --python: any interpreter will do (the target is --python-version); never download one
        argv = [uvexe.require(), "pip", "compile", "--no-config", "--quiet", "--no-header", "--annotation-style", "line",
                "--no-python-downloads", "--python", sys.executable,
                "--python-version", ctx.python, "--python-platform", uv_platform, "--only-binary", ":all:",
                "--index-url", index_url, "--find-links", str(t / "stubs"), "--constraint",
                str(t / "constraints.txt"), "--cache-dir", str(cache_dir / "uv"), "--output-file",
                str(t / "resolved.txt"), str(t / "requirements.in")]
        res = subproc.run(argv, timeout=UV_TIMEOUT_S, cwd=tmp,
                          env=subproc.clean_env(prefixes=("UV_", "PIP_"), NO_COLOR="1", **env_extra))
        if not res.ok:
            raise _resolve_error(res, reqs, provided, ctx, index_url)
        resolved = _parse_compiled((t / "resolved.txt").read_text())
    chosen = [(n, v, via) for n, v, via in resolved if n not in provided]
    extra = [(n, v, via) for n, v, via in chosen if n not in requested]
    if extra and ctx.policy == "conda":
        versions = {n: v for n, v, _ in chosen}
        needs = _requirements_of({p for _, _, via in extra for p in via if p in versions}, versions, index_url, ctx)
        lines = [f"{n} {v} (needed by {', '.join(f'{p}: {needs.get((p, n), n)}' for p in via) or 'a pip entry'})"
                 for n, v, via in extra]
        adds = ", ".join(f"`{reverse.conda(n)}{_conda_bounds(needs, n, via)}`" for n, _, via in extra)
        raise ConfigError(f"{ctx.spec_file}: the conda side lacks what the pip entries need on {ctx.platform}: "
                          + "; ".join(lines),
                          why="this spec sets `pip-dependencies: conda`: every dependency of a pip entry must come "
                              "from the conda side (pip entries are installed without dependencies)",
                          fix=f"Add {adds} to the spec's conda dependencies (with the bounds the entries need), "
                              "or set `pip-dependencies: lock` to lock them from PyPI.")
    out = []
    for name, version, via in chosen:
        files = pypi_index.files(index_url, name)
        out.append(_pick(name, version, files, ctx, via))
    for name, req in requested.items():
        _no_silent_downgrade(name, req, next(o["version"] for o in out if canonicalize_name(o["name"]) == name),
                             pypi_index.files(index_url, name), ctx)
    return out


def _requirements_of(names: set[str], versions: dict[str, str], index_url: str, ctx: Context) -> dict:
    """(package, dependency) → the Requires-Dist line, read from the chosen wheels' metadata (PEP 658)."""
    out = {}
    for name in sorted(names):
        try:
            url = _pick(name, versions[name], pypi_index.files(index_url, name), ctx, [])["url"]
            with urllib.request.urlopen(url + ".metadata", timeout=pypi_index.INDEX_TIMEOUT_S) as resp:
                text = resp.read().decode("utf-8", "replace")
        except (OSError, ConfigError, NetworkError):
            continue  # the names alone still say what is missing
        for line in text.splitlines():
            if line.startswith("Requires-Dist:"):
                try:
                    req = Requirement(line.split(":", 1)[1].strip())
                except InvalidRequirement:
                    continue
                if req.marker is None or req.marker.evaluate({"python_version": ctx.pyver, "extra": ""}):
                    out[(name, canonicalize_name(req.name))] = str(req)
    return out


def _conda_bounds(needs: dict, name: str, via: list[str]) -> str:
    """The version bounds the entries put on a dependency, as a conda spec suffix (' >=0.11.1,<0.14')."""
    specs = []
    for p in via:
        req = needs.get((p, name))
        if req is not None:
            specs += [str(s) for s in Requirement(req).specifier]
    return (" " + ",".join(sorted(set(specs)))) if specs else ""


def _pick(name: str, version: str, files: list[pypi_index.IndexFile], ctx: Context, via: list[str]) -> dict:
    """The one wheel of name==version installable on every machine the profile admits."""
    same = [f for f in files if f.is_wheel and f.version == Version(version) and not f.yanked]
    supported = wheels.supported_tags(ctx.pyver, ctx.wheel_platforms)
    ranked = sorted((r, i) for i, f in enumerate(same) if (r := wheels.rank(f.filename, supported)) is not None)
    good = [same[i] for _, i in ranked]  # the wheel whose best tag pip prefers first
    if not good:
        needs = sorted({wheels.platform_needs(f.filename) for f in same if wheels.for_platform(f.filename, ctx.platform)}) \
            or ["(no wheel for this platform at all)"]
        floor = ", ".join(ctx.wheel_platforms[:1]) or ctx.platform
        raise ConfigError(
            f"{name} {version}" + (f" (needed by {', '.join(via)})" if via else "")
            + f" has no wheel that installs on every {ctx.platform} machine the profile admits",
            why=f"its wheels need {'; '.join(needs)}; the profile's virtual packages ({ctx.vps_file}) admit machines "
                f"down to {floor} with Python {ctx.pyver}",
            fix=f"Raise the profile's minimum in {ctx.vps_file} (and the matching rule in profiles.yaml, with its "
                f"source) to what the wheel needs, pin a release whose wheels fit, or move {name} to the conda side.")
    best = good[0]
    if not best.sha256:
        raise ConfigError(f"the index gives no sha256 for {best.filename}", why=best.url,
                          fix="Use an index that publishes hashes (PyPI and its mirrors do).")
    return {"name": name, "version": version, "url": best.url, "sha256": best.sha256}


def _no_silent_downgrade(name: str, req: Requirement, chosen: str, files: list[pypi_index.IndexFile], ctx: Context) -> None:
    """An unpinned entry must get its newest release: an older one only because the newest has no wheel is refused."""
    if any(s.operator in ("==", "===") for s in req.specifier):
        return
    chosen_v = Version(chosen)
    candidates = {}
    for f in files:
        v = f.version
        if v is None or f.yanked or (v.is_prerelease and not chosen_v.is_prerelease) or v not in req.specifier:
            continue
        try:
            if f.requires_python and not SpecifierSet(f.requires_python).contains(ctx.python):
                continue
        except InvalidSpecifier:
            continue
        candidates.setdefault(v, []).append(f)
    newest = max(candidates, default=None)
    if newest is None or newest <= chosen_v:
        return
    kinds = sorted({("wheel needing " + wheels.platform_needs(f.filename)) if f.is_wheel else "sdist"
                    for f in candidates[newest]})
    raise ConfigError(
        f"pip entry {name}: the lock would take {chosen}, not the newest release {newest}",
        why=f"{name} {newest} has no wheel for {ctx.platform} with Python {ctx.pyver} (it has: {', '.join(kinds)}); "
            "lorastrap installs wheels only, so an older release would be chosen silently",
        fix=f"Pin `{name}=={chosen}` in {ctx.spec_file} if that release is what you want, or move {name} to the conda "
            "side (conda packages are built from the sdist).")


def _resolve_error(res: subproc.Result, reqs: list[str], provided: dict, ctx: Context, index_url: str) -> Exception:
    text = (res.stderr or res.stdout).strip()
    low = text.lower()
    if any(w in low for w in ("failed to fetch", "connection", "dns error", "timed out", "network")):
        return NetworkError(f"could not read the index {shown(index_url)} to resolve {', '.join(reqs)}", why=text[-1500:],
                            fix="Check the network or proxy, or pass --pip-index-url for a reachable index.")
    pinned = [f"{n} {v} (conda: {c})" for n, (c, v) in sorted(provided.items()) if n in low]
    absent = _absent_from_index(low)
    if absent:  # the index is the cause, not the conda side
        return ConfigError(
            f"the index {shown(index_url)} has no {', '.join(absent)}, which the pip entries of {ctx.spec_file} need",
            why=text[-3000:],
            fix=f"Pass --pip-index-url with the index that has {absent[0]} (`update` and `repair` use the one the "
                "environment was built with unless told otherwise), or change the pip entries.")
    return ConfigError(
        f"the pip entries of {ctx.spec_file} cannot be resolved for {ctx.platform} (Python {ctx.python}) together "
        "with the conda side",
        why=text[-3000:] + ("\n(`+conda` versions are the packages the conda side already provides: "
                            + ", ".join(pinned) + ")" if pinned else ""),
        fix="Give the conda side versions the pip entries accept (add bounds to the spec's conda dependencies), "
            "or change the pip entries.")


def _absent_from_index(low: str) -> list[str]:
    """The packages uv says the index does not have at all ("was not found in the package registry", "there are no
    versions of"): then the index, not the conda side, is what to change."""
    import re
    found = re.findall(r"(?:because |and )?([a-z0-9][a-z0-9._-]*) was not found in the package registry", low)
    found += re.findall(r"there (?:are|is) no versions? of ([a-z0-9][a-z0-9._-]*)", low)
    return list(dict.fromkeys(found))
