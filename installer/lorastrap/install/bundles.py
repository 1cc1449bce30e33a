"""Reading an offline bundle as a package source (fleet/bundle.py makes them): a .tar unpacked beside itself,
every file checked against the manifest, the bundle's lock rewritten to point at the bundle's own files."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from lorastrap.core import paths
from lorastrap.core.errors import ConfigError, IntegrityError
from lorastrap.core.records import BundleManifest
from lorastrap.install.cache import sha256_file
from lorastrap.locking import lockfile


def open_bundle(path: Path) -> Path:
    """A bundle folder (a .tar is unpacked next to it, once)."""
    path = path.absolute()
    if not path.exists():
        raise ConfigError(f"bundle {path} does not exist", fix="Pass the bundle folder or its .tar file.")
    if path.is_file() and path.suffix == ".tar":
        dest = path.with_suffix("")
        if not (dest / "manifest.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=path.parent))
            try:
                with tarfile.open(path) as t:
                    t.extractall(tmp, filter="data")
                inner = next((p for p in tmp.iterdir() if (p / "manifest.json").is_file()), None)
                if inner is None:
                    raise ConfigError(f"{path} is not a lorastrap bundle (no manifest.json inside)",
                                      fix="Build one with `lorastrap bundle --profile P --platform X -o PATH.tar`.")
                try:
                    os.rename(inner, dest)
                except OSError:
                    if not (dest / "manifest.json").exists():  # else: another node unpacked it meanwhile
                        raise
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ConfigError(f"{path} cannot be unpacked", why=f"a damaged or truncated tar file ({exc})",
                                  fix="Copy the bundle again (compare its size with the original), or rebuild it.")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        path = dest
    if not (path / "manifest.json").is_file():
        raise ConfigError(f"{path} is not a lorastrap bundle (no manifest.json)",
                          fix="Build one with `lorastrap bundle --profile P --platform X -o PATH`.")
    return path


def check(path: Path, *, deep: bool = False) -> BundleManifest:
    """Read the manifest; every file it lists must be there at its size (deep: and its sha256)."""
    try:
        manifest = BundleManifest.model_validate_json((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path / 'manifest.json'} is not a lorastrap bundle manifest",
                          why=str(exc).splitlines()[0], fix="Copy the whole bundle again, or rebuild it.")
    for rel, meta in manifest.files.items():
        p = path / rel
        if not p.is_file():
            raise IntegrityError(f"bundle {path}: {rel} is missing", why="the bundle is incomplete",
                                 fix="Copy the whole bundle again, or rebuild it.")
        if p.stat().st_size != meta.size or (deep and sha256_file(p) != meta.sha256):
            raise IntegrityError(f"bundle {path}: {rel} was altered (size or sha256 differs from the manifest)",
                                 why="the bundle was modified or damaged in transit",
                                 fix="Copy the bundle again, or rebuild it on the head node.")
    return manifest


def install_inputs(bundle: Path, machine) -> tuple[str, Path]:
    """The bundle's profile, and a copy of its lock (in the data dir) whose URLs are the bundle's files."""
    manifest = check(bundle)
    if manifest.platform != machine.platform:
        raise ConfigError(f"bundle {bundle} is for {manifest.platform}, this machine is {machine.platform}",
                          fix=f"Build a bundle with --platform {machine.platform}.")
    lk = lockfile.read_lock(bundle / manifest.lock)
    lock_dir = paths.data_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)

    def url_for(p: dict) -> str:
        fn = p["url"].rsplit("/", 1)[-1]
        if p["manager"] == "conda":
            return (bundle / "channel" / p["url"].rsplit("/", 2)[-2] / fn).as_uri()
        return (bundle / "pip" / fn).as_uri()
    out = lockfile.rewritten(lk, lock_dir / f"{manifest.profile}.bundle.conda-lock.yml", url_for,
                            channels=[(bundle / "channel").as_uri()])
    return manifest.profile, out
