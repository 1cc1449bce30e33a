"""Reading an offline bundle as a package source (fleet/bundle.py makes them): a .tar unpacked beside itself only
when the folder there is not this very tar's copy, every file checked against the manifest, the bundle's lock
rewritten to point at the bundle's own files, a checksum error named as the bundle's damage, and the bundle's
identity for reports."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lorastrap.core import locks, paths
from lorastrap.core.errors import ConfigError, IntegrityError, LorastrapError, NoProfileError
from lorastrap.core.records import BundleManifest
from lorastrap.install.cache import sha256_file
from lorastrap.locking import lockfile


def tar_manifest(tar: Path) -> bytes:
    """The manifest.json inside a bundle .tar (read from the tar's index, nothing unpacked): the bundle's identity,
    since it lists the sha256 of every file."""
    import tarfile  # here: an install not from a bundle reads no tar (~1.5 ms to import)
    try:
        with tarfile.open(tar) as t:
            for member in t:
                if member.isfile() and member.name.count("/") == 1 and member.name.endswith("/manifest.json"):
                    return t.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(f"{tar} cannot be read", why=f"a damaged or truncated tar file ({exc})",
                          fix="Copy the bundle again (compare its size with the original), or rebuild it.")
    raise ConfigError(f"{tar} is not a lorastrap bundle (no manifest.json inside)",
                      why="a bundle's tar holds one folder with the manifest listing every file; this tar has none",
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
        raise ConfigError(f"bundle {path} does not exist", why="nothing is at that path (moved, or not copied yet?)",
                          fix="Pass the bundle folder or its .tar file.")
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
                          why="a bundle folder starts with the manifest that lists every file in it",
                          fix="Build one with `lorastrap bundle --profile P --platform X -o PATH`.")
    return path


def _unpack(tar: Path, dest: Path, want: bytes, narrate) -> None:
    import tarfile
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
                              why="the tar holds no folder whose manifest is the one it was opened with",
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
                                           "it was altered or damaged after it was made",
                             fix="Nothing was installed. Copy the bundle again from where it was built, or rebuild "
                                 "it (`lorastrap bundle`); `lorastrap bundle` checks every file as it is made."
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


def check_contents(bundle: Path, manifest: BundleManifest) -> None:
    """Every file of the bundle against the sha256 its manifest lists — also those the package cache already
    holds (which the install would not read again), so an altered bundle is never masked by a warm cache.  Once
    per file version: a stamp in the data dir keeps each checked file's path, size, mtime and inode, and only a
    file whose stat changed is hashed again (a re-run that changes nothing stays cheap)."""
    import json
    from lorastrap.core import fsutil
    raw = (bundle / "manifest.json").read_bytes()
    stamp = paths.data_dir() / "bundles" / f"{hashlib.sha256(raw).hexdigest()[:16]}.checked.json"
    try:
        seen = json.loads(stamp.read_text())
    except (OSError, ValueError):
        seen = {}
    now = {}
    for rel, meta in manifest.files.items():
        p = bundle / rel
        st = p.stat()
        key = [str(p), st.st_size, st.st_mtime_ns, st.st_ino]
        if seen.get(rel) != key and sha256_file(p) != meta.sha256:
            raise IntegrityError(f"bundle {bundle}: {rel} was altered (checksum mismatch: its sha256 differs "
                                 "from the manifest's)",
                                 why=f"the bundle {bundle} holds a file that differs from what it was made with: "
                                     "it was altered or damaged after it was made",
                                 fix="Nothing was installed. Copy the bundle again from where it was built, or "
                                     "rebuild it (`lorastrap bundle`).")
        now[rel] = key
    if now != seen:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            fsutil.write_atomic(stamp, json.dumps(now) + "\n")
        except OSError:
            pass  # a read-only data dir: checked again next time


def install_inputs(bundle: Path, machine) -> tuple[str, Path]:
    """The bundle's profile, and a copy of its lock (in the data dir) whose URLs are the bundle's files."""
    manifest = check(bundle)
    check_contents(bundle, manifest)
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


def refuse_unfit(bundle: Path, plan, asked: bool) -> None:
    """A bundle's profile that this machine cannot run (a CUDA bundle on a node without a GPU) is refused, as the
    Slurm path refuses it; asked: the profile was named on the command line (then it is only a warning)."""
    if plan.broken and not asked:
        raise NoProfileError(f"bundle {bundle} holds profile {plan.profile}, which this machine cannot run",
                             why="; ".join(c.message for c in plan.broken),
                             fix=f"Install a bundle of the profile this machine plans (`lorastrap plan` names it), "
                                 f"or force this one with --profile {plan.profile}. Nothing was changed.")
