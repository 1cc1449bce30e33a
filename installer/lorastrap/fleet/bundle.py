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

`sh setup.sh --bundle PATH` (or `lorastrap install --bundle PATH`) installs from it with no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorastrap.locking import lock as locking
from lorastrap.core import locks, paths, subproc
from lorastrap.install import prefix as pfx
from lorastrap.install.cache import Cache, sha256_file
from lorastrap.core.errors import ConfigError, IntegrityError, LorastrapError, NetworkError
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
    for tag in locking.wheel_platforms(platform, vps):  # the nodes the profile admits
        argv += ["--platform", tag]
    res = subproc.run(argv, timeout=1800)
    if not res.ok:
        raise NetworkError("could not download lorastrap's runtime wheels for the bundle", why=res.tail(1),
                           fix="Bundle on a machine that reaches PyPI (or its mirror: PIP_INDEX_URL).")


def make(*, envs_dir: Path, name: str, lock_file: locking.Lock, platform: str, virtual_packages: dict[str, str],
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
            url = locking.mirrored(e.url, lock_file.channels, mirror)
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


def tar_manifest(tar: Path) -> bytes:
    """The manifest.json inside a bundle .tar (read from the tar's index, nothing unpacked): the bundle's identity,
    since it lists the sha256 of every file."""
    try:
        with tarfile.open(tar) as t:
            for member in t:
                if member.isfile() and member.name.count("/") == 1 and member.name.endswith("/manifest.json"):
                    return t.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(f"{tar} cannot be read", why=f"a damaged or truncated tar file ({exc})",
                          fix="Copy the bundle again (compare its size with the original), or rebuild it.")
    raise ConfigError(f"{tar} is not a lorastrap bundle (no manifest.json inside)",
                      fix="Build one with `lorastrap bundle --profile P --platform X -o PATH.tar`.")


def _current(dest: Path, want: bytes) -> bool:
    """Whether the folder DEST is the unpacked copy of the bundle whose manifest is WANT, every file at its size."""
    try:
        if (dest / "manifest.json").read_bytes() != want:
            return False
        check(dest)
        return True
    except (OSError, LorastrapError):
        return False


def open_bundle(path: Path, narrate=lambda m: None) -> Path:
    """A bundle folder.  A .tar is unpacked next to it (X.tar → X/) when X/ is not the unpacked copy of this very
    tar: the two manifests (which hold every file's sha256) must be the same bytes and every file there at its
    size, else X/ (an older build of the bundle, or a damaged copy) is replaced by a fresh unpacking, under a lock
    beside the tar so that nodes sharing the folder unpack it once."""
    path = path.absolute()
    if not path.exists():
        raise ConfigError(f"bundle {path} does not exist", fix="Pass the bundle folder or its .tar file.")
    if path.is_file() and path.suffix == ".tar":
        dest = path.with_suffix("")
        want = tar_manifest(path)
        if not _current(dest, want):
            with locks.held(path.parent / f".{path.name}.lock", what=f"the unpacking of {path}", narrate=narrate):
                if not _current(dest, want):  # another node may have unpacked it meanwhile
                    _unpack(path, dest, want, narrate)
        path = dest
    if not (path / "manifest.json").is_file():
        raise ConfigError(f"{path} is not a lorastrap bundle (no manifest.json)",
                          fix="Build one with `lorastrap bundle --profile P --platform X -o PATH`.")
    return path


def _unpack(tar: Path, dest: Path, want: bytes, narrate) -> None:
    narrate(f"unpacking {tar}" + (f" (replacing {dest}: another build of the bundle, or a damaged copy)"
                                  if dest.exists() else ""))
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=tar.parent))
    try:
        try:
            with tarfile.open(tar) as t:
                t.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ConfigError(f"{tar} cannot be unpacked", why=f"a damaged or truncated tar file ({exc})",
                              fix="Copy the bundle again (compare its size with the original), or rebuild it.")
        inner = next((p for p in tmp.iterdir() if (p / "manifest.json").is_file()), None)
        if inner is None or (inner / "manifest.json").read_bytes() != want:
            raise ConfigError(f"{tar} is not a lorastrap bundle (no manifest.json inside)",
                              fix="Build one with `lorastrap bundle --profile P --platform X -o PATH.tar`.")
        if dest.exists() or dest.is_symlink():
            old = tmp / ".replaced"
            os.rename(dest, old)  # one rename each way: a reader sees the old folder or the new one
        os.rename(inner, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def identity(path: Path) -> dict:
    """What identifies an opened bundle in reports: its path, profile, when it was made, and the sha256 of its
    manifest (which lists every file's sha256, so any change to the bundle changes it)."""
    raw = (path / "manifest.json").read_bytes()
    try:
        manifest = BundleManifest.model_validate_json(raw)
        created, profile = manifest.created, manifest.profile
    except ValueError:
        created = profile = None
    return {"path": str(path), "id": hashlib.sha256(raw).hexdigest()[:16], "profile": profile, "created": created}


@contextmanager
def damage_named(path: Path | None):
    """A checksum mismatch on a file of the bundle at PATH says that the bundle is damaged (not the mirror)."""
    try:
        yield
    except IntegrityError as exc:
        if path is None or "checksum mismatch" not in exc.what:
            raise
        raise IntegrityError(exc.what, why=f"the bundle {path} holds a file that differs from what its lock names: "
                                           f"it was altered or damaged after it was made",
                             fix=f"Nothing was installed. Copy the bundle again from where it was built, or rebuild "
                                 f"it (`lorastrap bundle`); `lorastrap bundle` checks every file as it is made."
                             ) from None


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
    lk = locking.read_lock(bundle / manifest.lock)
    lock_dir = paths.data_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)

    def url_for(p: dict) -> str:
        fn = p["url"].rsplit("/", 1)[-1]
        if p["manager"] == "conda":
            return (bundle / "channel" / p["url"].rsplit("/", 2)[-2] / fn).as_uri()
        return (bundle / "pip" / fn).as_uri()
    out = locking.rewritten(lk, lock_dir / f"{manifest.profile}.bundle.conda-lock.yml", url_for,
                            channels=[(bundle / "channel").as_uri()])
    return manifest.profile, out


def refuse_unfit(bundle: Path, plan, asked: bool) -> None:
    """A bundle's profile that this machine cannot run (a CUDA bundle on a node without a GPU) is refused, as the
    Slurm path refuses it; asked: the profile was named on the command line (then it is only a warning)."""
    if plan.broken and not asked:
        from lorastrap.core.errors import NoProfileError
        raise NoProfileError(f"bundle {bundle} holds profile {plan.profile}, which this machine cannot run",
                             why="; ".join(c.message for c in plan.broken),
                             fix=f"Install a bundle of the profile this machine plans (`lorastrap plan` names it), "
                                 f"or force this one with --profile {plan.profile}. Nothing was changed.")
