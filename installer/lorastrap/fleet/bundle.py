"""Offline bundles for fleets: one folder (or .tar) holding everything a node needs, checked as it is made.

    bundle/
      manifest.json          what is inside, with sizes and sha256 (schema_version 1)
      lock/PROFILE.conda-lock.yml
      channel/SUBDIR/…       every archive the lock names (sha256 checked while bundling) + repodata.json:
                             a valid conda channel folder (micromamba and conda can use it too)
      pip/…                  the lock's pip wheels
      source/…               lorastrap itself (setup.sh, installer/, envs/, scripts/, requirements*.txt)
      envs/…                 the profiles the bundle was made from (profiles.yaml, specs, virtual packages)
    lorastrap-runtime/wheels/…  beside the bundles: lorastrap's own runtime (requirements.txt) as wheels, one store
                             that every bundle in the folder shares (each wheel once, by its file name; the manifest
                             of each bundle lists the wheels it needs with their sha256, and requirements.txt's
                             hashes are checked again when setup.sh installs them)

The runtime wheels are most of a bundle's size (about 67 of 72 MiB for a small profile), and the same for every
profile of a platform: kept beside the bundles, a fleet with several profiles carries them once.  --self-contained
keeps them inside instead (runtime/wheels/), for a bundle that travels alone.

`sh setup.sh --bundle PATH` (or `lorastrap install --bundle PATH`) installs from it with no network; reading a bundle
(unpacking, checking it against its manifest, its lock pointed at its files) is install/bundles.py's.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from lorastrap.locking import channels, lockfile, wheels
from lorastrap.core import locks, paths, subproc
from lorastrap.install import prefix as pfx
from lorastrap.install.cache import Cache, sha256_file
from lorastrap.install.transaction import sources_to_fetch
from lorastrap.core.errors import ConfigError, IntegrityError, NetworkError
from lorastrap.core.records import BundleFile, BundleManifest, RuntimeWheels

RUNTIME_STORE = "lorastrap-runtime"  # beside the bundles; its wheels/ is what setup.sh installs the runtime from
SOURCE_ITEMS = ["setup.sh", "installer", "envs", "scripts", "requirements.txt", "requirements.in", "pyproject.toml",
                "README.md", "deploy"]



def _copy_source(dest: Path) -> None:
    if paths.ROOT is None:
        raise ConfigError("a bundle carries lorastrap's source (setup.sh, installer/, envs/), and this lorastrap "
                          "was installed without it", fix="Run `lorastrap bundle` from a lorastrap checkout.")
    for item in SOURCE_ITEMS:
        src = paths.ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, dest / item)


# pip's words when the index answered but holds no file these tags admit, and when it could not be reached at all
_NO_MATCH = "No matching distribution found for "
_UNREACHED = ("NewConnectionError", "Failed to establish a new connection", "ProxyError", "Could not fetch URL",
              "Temporary failure in name resolution", "Max retries exceeded")


def _runtime_wheels(dest: Path, platform: str, vps: dict[str, str], python_version: str, profile: str = "") -> None:
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--isolated",
            "--require-hashes", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "-r", str(paths.REQUIREMENTS), "-d", str(dest)]
    plats = wheels.wheel_platforms(platform, vps)  # the nodes the profile admits
    for tag in plats:
        argv += ["--platform", tag]
    res = subproc.run(argv, timeout=1800)
    if res.ok:
        return
    missing = next((line.split(_NO_MATCH, 1)[1].strip() for line in res.stderr.splitlines() if _NO_MATCH in line),
                   None)
    if missing and not any(word in res.stderr for word in _UNREACHED):
        glibc = f", glibc {vps['__glibc']}" if "__glibc" in vps else (f", macOS {vps['__osx']}" if "__osx" in vps
                                                                       else "")
        where = f"profile {profile}'s virtual-packages file" if profile else "the profile's virtual-packages file"
        raise ConfigError(f"lorastrap's runtime has no wheel of {missing} for {platform}{glibc}, Python "
                          f"{python_version}, so the bundle's nodes could not run lorastrap",
                          why=f"the index answered, and none of {missing}'s files has a tag these nodes admit "
                              f"({plats[0]} … {plats[-1]}: the {platform} minimums of {where}); "
                              f"a wheel built for a newer glibc (manylinux_2_28 needs 2.28) or another Python is "
                              f"not one these nodes can install",
                          fix=f"Look up the file names of {missing} on PyPI: if the nodes have the glibc its "
                              f"{platform} wheel names (manylinux_2_N: glibc 2.N), raise __glibc for {platform} in "
                              f"{where} to it and lock and bundle again (with --python-version X.Y when the "
                              f"nodes' Python is not this one).")
    raise NetworkError("could not download lorastrap's runtime wheels for the bundle", why=res.tail(1),
                       fix="Bundle on a machine that reaches PyPI (pip runs --isolated here: PIP_INDEX_URL and the "
                           "user's pip.conf are not read; a mirror in /etc/pip.conf is).")


def _into_store(downloaded: Path, store: Path, narrate) -> dict[str, BundleFile]:
    """Move the wheels in DOWNLOADED into the shared STORE (its wheels/ folder), each once: a wheel already there is
    kept when it is the same file, and refused when a file of that name differs (a wheel's name stands for its
    content on PyPI, so a different file is a damaged or altered store).  Returns the wheels, by name."""
    wheels_dir = store / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, BundleFile] = {}
    added = 0
    with locks.held(store / ".store.lock", what=f"the wheel store {store}", narrate=narrate):
        for w in sorted(downloaded.iterdir()):
            meta = BundleFile(size=w.stat().st_size, sha256=sha256_file(w))
            target = wheels_dir / w.name
            if target.exists():
                if target.stat().st_size != meta.size or sha256_file(target) != meta.sha256:
                    raise IntegrityError(f"{target} differs from the wheel of that name just downloaded",
                                         why="a wheel's name stands for one file: the store's copy was altered or "
                                             "damaged (other bundles that list it would fail too)",
                                         fix=f"Remove {target} and bundle again; then rebuild the bundles beside it "
                                             f"that were made from the damaged copy.")
            else:
                part = wheels_dir / f".{w.name}.part"
                shutil.copyfile(w, part)
                os.replace(part, target)
                added += 1
            out[w.name] = meta
    narrate(f"runtime wheels: {len(out)} in {wheels_dir} ({added} added, {len(out) - added} already there, shared "
            f"with the other bundles in {store.parent})")
    return out


def make(*, envs_dir: Path, name: str, lock_file: lockfile.Lock, platform: str, virtual_packages: dict[str, str],
         out: Path,
         mirror: str | None = None, python_version: str | None = None, self_contained: bool = False,
         pip_index_url: str = channels.DEFAULT_PIP_INDEX, logins=lambda: [],
         narrate=lambda m: None) -> BundleManifest:
    """Build the bundle at out (a folder, or a .tar file), its runtime wheels in the store beside it
    (OUT's folder/lorastrap-runtime), or inside it with self_contained.  Each archive comes from where an install
    would fetch it (transaction.sources_to_fetch: --mirror, --pip-index-url, and the login of LOGINS() the lock's
    URL lies under).  Returns the manifest."""
    entries = lock_file.for_platform(platform)
    if not entries:
        raise ConfigError(f"{lock_file.path} has no {platform} section",
                          fix=f"Lock for it: `lorastrap lock --profile {name} --platform {platform}`.")
    as_tar = out.suffix == ".tar"
    work = Path(tempfile.mkdtemp(prefix=".lorastrap-bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        root = work / "bundle"
        for d in ("lock", "channel", "pip", "source"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(lock_file.path, root / "lock" / f"{name}.conda-lock.yml")
        cache = Cache(paths.cache_dir())
        pip_bytes = conda_bytes = 0
        for e, source in zip(entries, sources_to_fetch(cache, entries, lock_file.channels, mirror, pip_index_url,
                                                       logins)):
            cached, _ = cache.fetch(*source)  # sha256 checked here
            if e.manager == "conda":
                subdir = e.url.rsplit("/", 2)[-2]
                target = root / "channel" / subdir / e.filename
                conda_bytes += cached.stat().st_size
            else:
                target = root / "pip" / e.filename
                pip_bytes += cached.stat().st_size
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, target)
        narrate(f"{len(entries)} packages checked and copied ({(conda_bytes + pip_bytes) / 2**20:.1f} MiB)")
        (root / "channel" / "noarch").mkdir(exist_ok=True)
        answer = subproc.worker("locking.rattler_worker", {"op": "index", "channel": str(root / "channel")}, timeout=600)
        if not answer.get("ok"):
            raise ConfigError("could not index the bundle's channel", why=answer.get("error", ""))
        pyver = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        narrate(f"downloading lorastrap's runtime wheels for {platform}, Python {pyver}")
        downloaded = root / "runtime" / "wheels" if self_contained else work / "runtime-wheels"
        downloaded.mkdir(parents=True)
        _runtime_wheels(downloaded, platform, virtual_packages, pyver, name)
        runtime = None if self_contained else RuntimeWheels(
            store=f"../{RUNTIME_STORE}/wheels", wheels=_into_store(downloaded, out.parent / RUNTIME_STORE, narrate))
        _copy_source(root / "source")
        shutil.copytree(envs_dir, root / "envs", ignore=shutil.ignore_patterns("*.conda-lock.yml"))
        files = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = BundleManifest(profile=name, platform=platform, python_version=pyver, created=pfx.now(),
                                  lock=f"lock/{name}.conda-lock.yml", channel="channel", packages=len(entries),
                                  bytes=sum(f["size"] for f in files.values()), files=files, runtime=runtime)
        (root / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        if as_tar:
            tmp_tar = work / out.name
            with tarfile.open(tmp_tar, "w") as t:
                t.add(root, arcname=out.stem)
            os.replace(tmp_tar, out)
        else:
            if out.exists():
                shutil.rmtree(out)
            os.rename(root, out)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
