"""Offline bundles for fleets: one folder (or .tar) holding everything a node needs, checked as it is made.

    bundle/
      manifest.json          what is inside, with sizes and sha256 (schema_version 1)
      lock/PROFILE.conda-lock.yml
      channel/SUBDIR/…       every archive the lock names (sha256 checked while bundling) + repodata.json:
                             a valid conda channel folder (micromamba and conda can use it too)
      pip/…                  the lock's pip wheels
      runtime/wheels/…       lorastrap's own runtime (requirements.txt) as wheels for the target platform
      source/…               lorastrap itself (setup.sh, installer/, envs/, scripts/, requirements*.txt)
      envs/…                 the profiles the bundle was made from (profiles.yaml, specs, virtual packages)

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
from lorastrap.core import paths, subproc
from lorastrap.install import prefix as pfx
from lorastrap.install.cache import Cache, sha256_file
from lorastrap.core.errors import ConfigError, NetworkError
from lorastrap.core.records import BundleManifest

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


def _runtime_wheels(dest: Path, platform: str, vps: dict[str, str], python_version: str) -> None:
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--isolated",
            "--require-hashes", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            "-r", str(paths.REQUIREMENTS), "-d", str(dest)]
    for tag in wheels.wheel_platforms(platform, vps):  # the nodes the profile admits
        argv += ["--platform", tag]
    res = subproc.run(argv, timeout=1800)
    if not res.ok:
        raise NetworkError("could not download lorastrap's runtime wheels for the bundle", why=res.tail(1),
                           fix="Bundle on a machine that reaches PyPI (or its mirror: PIP_INDEX_URL).")


def make(*, envs_dir: Path, name: str, lock_file: lockfile.Lock, platform: str, virtual_packages: dict[str, str],
         out: Path,
         mirror: str | None = None, python_version: str | None = None, narrate=lambda m: None) -> BundleManifest:
    """Build the bundle at out (a folder, or a .tar file).  Returns the manifest."""
    entries = lock_file.for_platform(platform)
    if not entries:
        raise ConfigError(f"{lock_file.path} has no {platform} section",
                          fix=f"Lock for it: `lorastrap lock --profile {name} --platform {platform}`.")
    as_tar = out.suffix == ".tar"
    work = Path(tempfile.mkdtemp(prefix=".lorastrap-bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        root = work / "bundle"
        for d in ("lock", "channel", "pip", "runtime/wheels", "source"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(lock_file.path, root / "lock" / f"{name}.conda-lock.yml")
        cache = Cache(paths.cache_dir())
        pip_bytes = conda_bytes = 0
        for e in entries:
            url = channels.mirrored(e.url, lock_file.channels, mirror)
            cached, _ = cache.fetch(url, e.sha256, e.filename)  # sha256 checked here
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
        _runtime_wheels(root / "runtime" / "wheels", platform, virtual_packages, pyver)
        _copy_source(root / "source")
        shutil.copytree(envs_dir, root / "envs", ignore=shutil.ignore_patterns("*.conda-lock.yml"))
        files = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = BundleManifest(profile=name, platform=platform, python_version=pyver, created=pfx.now(),
                                  lock=f"lock/{name}.conda-lock.yml", channel="channel", packages=len(entries),
                                  bytes=sum(f["size"] for f in files.values()), files=files)
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
