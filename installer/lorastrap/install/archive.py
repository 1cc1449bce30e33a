"""What a package archive says about its own files: ``info/paths.json`` read straight from a checked archive
(`.conda`: a zip holding ``info-*.tar.zst``; `.tar.bz2`: one tar), without an engine.

Used before anything changes — the prefix-length preflight (a binary prefix placeholder can only be overwritten
by a path no longer than itself: conda and rattler pad the new prefix with NULs and refuse a longer one) — and to
validate an extracted copy in the package cache against the hashes its own package lists.

``inspect`` is the containment check every archive passes before an engine sees it: no path of the package (its
tar members and its info/paths.json) may leave the prefix — absolute, ``..``, or written through a symbolic link
the package itself makes (a link may point anywhere; nothing may be written *through* one) — and no member may be
a device or a FIFO.  It also returns what the package needs on disk unpacked (a small archive of a huge, highly
compressible file is sized by what it unpacks to, not by its bytes) and its link scripts.

``unpack`` lays a checked big archive out in the embedded engine's package cache as py-rattler's own extract does
(the tests compare the two, file by file), without hashing its bytes a second time.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # read where they are used: a warm install reads no archive (zstandard alone ~3 ms to import)
    import tarfile
    import zipfile

from lorastrap.core.errors import IntegrityError, UnsafePackageError


def paths_json(archive: Path) -> dict:
    """The archive's info/paths.json (``{"paths": [...], "paths_version": 1}``)."""
    import tarfile
    import zipfile

    import zstandard
    try:
        if archive.name.endswith(".conda"):
            with zipfile.ZipFile(archive) as z:
                info = next(n for n in z.namelist() if n.startswith("info-") and n.endswith(".tar.zst"))
                raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(z.read(info))).read()
            with tarfile.open(fileobj=io.BytesIO(raw)) as t:
                return json.load(t.extractfile("info/paths.json"))
        with tarfile.open(archive, "r:bz2") as t:
            return json.load(t.extractfile("info/paths.json"))
    except (OSError, KeyError, StopIteration, ValueError, RuntimeError, zipfile.BadZipFile, tarfile.TarError,
            zstandard.ZstdError, *_codec_errors()) as exc:  # RuntimeError: zipfile's, encrypted or unknown method
        raise IntegrityError(f"{archive.name}: its info/paths.json cannot be read", why=str(exc) or type(exc).__name__,
                             fix="Delete the package cache entry (the data dir's pkgs/) and rerun.")


def _codec_errors() -> tuple:
    """What zipfile's decompressors raise for a damaged member of another method than a .conda's stored ones
    (deflate: zlib.error; LZMA: lzma.LZMAError — neither an OSError)."""
    import zlib
    try:
        import lzma
    except ImportError:  # an interpreter built without it: zipfile cannot read such a member either
        return (zlib.error,)
    return (zlib.error, lzma.LZMAError)


def binary_placeholder_length(entries: list[dict]) -> int | None:
    """The shortest binary prefix placeholder among a package's info/paths.json entries (None: it has none)."""
    lengths = [len(p["prefix_placeholder"]) for p in entries
               if isinstance(p, dict) and p.get("prefix_placeholder") and p.get("file_mode") == "binary"]
    return min(lengths) if lengths else None


LINK_SCRIPT = re.compile(r"^(bin/\.[^/]+-(pre-link|post-link|pre-unlink)\.sh|Scripts/\.[^/]+-(pre-link|post-link|pre-unlink)\.bat)$")


def _outside(rel: str) -> bool:
    """A path relative to the prefix that leaves it (or names nothing: empty, NUL)."""
    if not rel or "\0" in rel or rel.startswith("/"):
        return True
    norm = posixpath.normpath(rel)
    return norm == ".." or norm.startswith("../") or norm == "."


def _through_link(rel: str, links: dict[str, str]) -> str | None:
    """The link among LINKS (path → target, both as the package writes them) through which REL, written below it,
    would land outside the prefix; None when REL stays inside (a link to a folder of the package itself, such as
    lib64 → lib, is fine)."""
    parts = [p for p in posixpath.normpath(rel).split("/") if p not in ("", ".")]
    i, hops = 1, 0
    while i < len(parts):
        parent = "/".join(parts[:i])
        target = links.get(parent)
        if target is None:
            i += 1
            continue
        hops += 1
        landed = posixpath.normpath(posixpath.join(posixpath.dirname(parent), target))
        if hops > 40 or target.startswith("/") or landed == ".." or landed.startswith("../"):
            return parent
        parts = [p for p in landed.split("/") if p not in ("", ".")] + parts[i:]
        i = 1
    return None


def _unsafe(archive: Path, what: str, why: str) -> UnsafePackageError:
    return UnsafePackageError(f"{archive.name}: {what}",
                              why=why + "; lorastrap links no package that writes outside its environment",
                              fix="Nothing was installed. Remove the package from the lock (or the channel), or "
                                  "report it to whoever publishes it.")


STREAM_BLOCK = 1 << 20  # what a streamed .tar.bz2 is read by (tarfile's 10 KiB: ~33,000 reads for 320 MiB)


class _Stored(io.RawIOBase):
    """The bytes of a zip member stored as they are (what a .conda's members are), read straight from the archive:
    zipfile's reader would compute their CRC-32 too (~60 ms for 320 MiB), which says nothing the lock's sha256 of
    the whole archive has not already said."""

    def __init__(self, f, start: int, size: int):
        self.f, self.left = f, size
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        want = min(len(buf), self.left)
        if want <= 0:
            return 0
        got = self.f.readinto(memoryview(buf)[:want])
        if not got:
            raise EOFError("the archive ends inside a member")
        self.left -= got
        return got


MEMBER_MOST = 1 << 44  # 16 TiB: a tar member that claims more is no package's (and would take forever to skip)
READ_MOST = 256 << 20  # the most one read of the inner tar may hold: a pax or GNU header's data, info/paths.json


class _Forward:
    """A .conda's decompressed inner tar as tarfile's seekable reader sees it.  A tar header names any size (up to
    2**95 in base-256): tarfile reads a pax or GNU long-name header's data, and info/paths.json, with one read of
    the size it names, and seeks past a member by its size.  zstandard would allocate such a read whole (a
    MemoryError or OverflowError, not an unreadable archive); here a read takes the stream in blocks, as far as
    it goes, and no more than READ_MOST (a member's own size is bounded by _sized)."""

    def __init__(self, stream):
        self.stream = stream

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.stream.seek(pos, whence)  # past a member, whose size _sized has bounded

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and 0 <= n <= STREAM_BLOCK:
            return self.stream.read(n)
        parts, got = [], 0
        while n is None or n < 0 or got < n:
            block = self.stream.read(STREAM_BLOCK if n is None or n < 0 else min(STREAM_BLOCK, n - got))
            if not block:
                break
            got += len(block)
            if got > READ_MOST:
                raise ValueError(f"a tar header's data or info/paths.json over {READ_MOST >> 20} MiB")
            parts.append(block)
        return b"".join(parts)


def _member_stream(z: zipfile.ZipFile, f, info: zipfile.ZipInfo):
    """A reader of a .conda's inner member: straight from the file when it is stored (its data after the local
    header), else zipfile's own."""
    import zipfile
    if info.flag_bits & 0x1:  # zipfile: a RuntimeError (a password is needed), not an archive error
        raise zipfile.BadZipFile(f"{info.filename} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        try:
            return z.open(info)
        except NotImplementedError as exc:  # a compression method zipfile does not know
            raise zipfile.BadZipFile(f"{info.filename}: {exc}") from None
    f.seek(info.header_offset)
    header = f.read(zipfile.sizeFileHeader)
    if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    fields = struct.unpack(zipfile.structFileHeader, header)
    start = info.header_offset + zipfile.sizeFileHeader + fields[zipfile._FH_FILENAME_LENGTH] \
        + fields[zipfile._FH_EXTRA_FIELD_LENGTH]
    return _Stored(f, start, info.compress_size)


def _members(archive: Path):
    """(tar, member) for every tar member of the archive (both inner tars of a .conda), streamed: nothing is
    unpacked."""
    import tarfile
    import zipfile

    import zstandard
    if archive.name.endswith(".conda"):
        with open(archive, "rb") as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.filename.endswith(".tar.zst"):
                    # Read as a seekable tar (forward only: zstandard skips a member's bytes in C, ~3x faster
                    # than tarfile's stream mode copying them through Python); a seek backwards (no sound tar
                    # asks for one) fails, and the archive counts as unreadable.
                    with _member_stream(z, f, info) as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream, \
                            tarfile.open(fileobj=_Forward(stream), mode="r:") as t:
                        yield from _sized(t)
    else:
        with tarfile.open(archive, "r|bz2", bufsize=STREAM_BLOCK) as t:
            yield from _sized(t)


def _sized(t: tarfile.TarFile):
    """(t, member) for each member, refusing one that claims more than MEMBER_MOST before tarfile skips past it (a
    stream would skip 2**70 bytes block by block for ever; a seek that far is no file's)."""
    for m in t:
        if m.size > MEMBER_MOST:
            raise ValueError(f"its member {m.name!r} claims {m.size} bytes")
        yield t, m


class Changed(Exception):
    """The archive is not the one that was checked any more (unpack's UNCHANGED said so)."""


class Stopped(Exception):
    """unpack was told to stop (its STOPPED said so)."""


def _refuse(archive: Path, name: str, m: tarfile.TarInfo) -> None:
    """UnsafePackageError for a tar member NAME (M) that is outside the prefix on its own: an absolute or .. path,
    a hard link to one, a device or a FIFO (inspect's check and unpack's; a path written through a link is judged
    by the links the package makes)."""
    if _outside(name):
        raise _unsafe(archive, f"its member {name!r} lies outside the environment",
                      why="an absolute path or one with .. would be written outside the prefix")
    if m.islnk() and _outside(m.linkname):
        raise _unsafe(archive, f"its hard link {name!r} names {m.linkname!r}",
                      why="a hard link to a path outside the package")
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise _unsafe(archive, f"its member {name!r} is a device or FIFO",
                      why="conda packages hold files, folders and links only")


def _parts(archive: Path, name: str) -> list[str]:
    """The folders and name of a member's path NAME (a member's own, or the file a hard link names), for unpack:
    refused with "..", kept by the kernel after a link and so never normalised away here, or deeper than
    UNPACK_DEPTH (a descriptor held a level, and a tree shutil.rmtree cannot remove)."""
    import tarfile
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _unsafe(archive, f"its member {name!r} names a parent folder",
                      why="a path with .. may leave the environment through a link it passes")
    if len(parts) > UNPACK_DEPTH:
        raise tarfile.TarError(f"its member {name[:80]!r}... is {len(parts)} folders deep")
    return parts


def _admitted(archive: Path):
    """unpack's check of each member (one per archive): containment was inspect's, on these same bytes; this
    refuses again what inspect refuses, and what it would take apart only on disk (tarfile's own extraction filters
    resolve each member's path there, ~50 us a member).  Returns the member's path as its parts."""
    import tarfile
    links: dict[str, str] = {}

    def admit(member: tarfile.TarInfo) -> list[str]:
        name = member.name[2:] if member.name.startswith("./") else member.name
        _refuse(archive, name, member)
        parts = _parts(archive, name)
        if member.issparse():
            raise tarfile.TarError(f"its member {name!r} is a sparse file")  # unpacked by the engine instead
        through = _through_link(name, links)
        if through:
            raise _unsafe(archive, f"its member {name!r} is written through the link {through}",
                          why="a file below a symbolic link the package makes lands wherever that link points")
        if member.issym():
            links[posixpath.normpath(name)] = member.linkname
        return parts
    return admit


UNPACK_BLOCK = 64 << 10  # what unpack decompresses and writes at a time, into one buffer (see unpack)
UNPACK_DEPTH = 128  # the most folders a member's path may go down (a real package's deepest: a few dozen)


def unpack(archive: Path, dest: Path, *, unchanged, stopped=lambda: False) -> None:
    """Unpack a checked .conda into DEST (a new folder) as the engines do: every member of both inner tars (info and
    pkg), nothing else, without hashing its bytes again (py-rattler's extract hashes them, sha256 and md5: a 320 MiB
    archive ~1.0 s, here ~0.25-0.6 s).  As rattler's tar-rs does, a file or folder gets its mode's permission bits
    (mode & 0o777: group write kept, setuid dropped) and a file its mtime (_mtime); a hard link gives its file its
    own mtime, not its mode; a member replaces a file or link of the same name; nothing is owned by the archive's
    owner.  test_worker_feed and test_units compare the result with py-rattler's extract, file by file.

    Nothing is written, made or changed through a link: each path is walked from DEST's own descriptor, one folder
    at a time, none of them a symbolic link (O_NOFOLLOW) — a package whose members pass through a link, its own or
    one a hard link named, is refused here (the link step's engine unpacks it then), whatever its names say.  A
    file's bytes are decompressed into one buffer of UNPACK_BLOCK and written from it: 1 MiB blocks, each a fresh
    allocation (tarfile's copy, zstandard's reads), cost ~100,000 page faults and ~1.2 s of system time for 320
    MiB on these machines.

    UNCHANGED(os.stat_result) says whether the file opened is still the one that was checked (its stats as
    recorded then), asked before its first byte is read and after its last: the bytes unpacked are the checked ones
    (a write in between moves the ctime).  Raises Changed when it is not, IntegrityError when the archive cannot be
    read or unpacked, UnsafePackageError for a member inspect refuses, Stopped once STOPPED() is true (asked each
    block); what was unpacked is then the caller's to remove."""
    import tarfile
    import zipfile

    import zstandard
    if not archive.name.endswith(".conda"):
        raise IntegrityError(f"{archive.name}: lorastrap unpacks .conda archives only", why="a .tar.bz2",
                             fix="The engine unpacks it.")
    admit = _admitted(archive)
    view = memoryview(bytearray(UNPACK_BLOCK))
    folders: dict[tuple[str, ...], int] = {}
    try:
        with open(archive, "rb") as f:
            if not unchanged(os.fstat(f.fileno())):
                raise Changed(archive.name)
            dest.mkdir(parents=True, exist_ok=True)
            with _Folders(dest) as at, zipfile.ZipFile(f) as z:
                for info in z.infolist():
                    if info.filename.endswith(".tar.zst"):
                        with _member_stream(z, f, info) as raw, \
                                zstandard.ZstdDecompressor().stream_reader(raw, read_size=UNPACK_BLOCK) as s:
                            _unpack_tar(archive, s, at, admit, view, folders, stopped)
                for parts, mode in sorted(folders.items(), key=lambda item: -len(item[0])):  # last, deepest first
                    fd = at.folder(parts, make=False)
                    os.fchmod(fd, mode)
            if not unchanged(os.fstat(f.fileno())):
                raise Changed(archive.name)
    except (Changed, Stopped):
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, tarfile.TarError, zstandard.ZstdError,
            *_codec_errors()) as exc:
        raise IntegrityError(f"{archive.name}: the archive cannot be unpacked", why=str(exc) or type(exc).__name__,
                             fix="Delete the package cache entry (the data dir's pkgs/) and rerun.")


class _Folders:
    """Descriptors of the folders below a root, opened one level at a time without following a link (O_NOFOLLOW:
    a link anywhere on the way is ELOOP or ENOTDIR), made when missing.  Kept for the path last asked and its
    parents (tar members come folder by folder), so a member costs one open at most."""

    OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, root: Path):
        self.root = os.open(root, self.OPEN)
        self.held: list[tuple[str, int]] = []  # (name, descriptor) from the root down: the path last asked

    def __enter__(self) -> _Folders:
        return self

    def __exit__(self, *exc) -> None:
        for _, fd in self.held:
            os.close(fd)
        os.close(self.root)

    def walk(self, parts) -> int:
        """A descriptor of its own (the caller's to close) of the existing folder ROOT/PARTS."""
        fd = os.dup(self.root)
        for name in parts:
            try:
                inner = os.open(name, self.OPEN, dir_fd=fd)
            finally:
                os.close(fd)
            fd = inner
        return fd

    def folder(self, parts, *, make: bool = True) -> int:
        """The descriptor of the folder ROOT/PARTS (valid until the next call)."""
        same = 0
        while same < min(len(parts), len(self.held)) and self.held[same][0] == parts[same]:
            same += 1
        for _, fd in self.held[same:]:
            os.close(fd)
        del self.held[same:]
        for name in parts[same:]:
            parent = self.held[-1][1] if self.held else self.root
            if make:
                try:
                    os.mkdir(name, 0o777, dir_fd=parent)
                except FileExistsError:
                    pass
            self.held.append((name, os.open(name, self.OPEN, dir_fd=parent)))
        return self.held[-1][1] if self.held else self.root


def _clear(name: str, parent: int) -> None:
    """Make room for a member named NAME in the folder PARENT: a file or link there already is removed (the engines
    replace it; writing into it would write into every other name it has), a folder is left (the member's own
    creation then fails)."""
    import stat
    try:
        if not stat.S_ISDIR(os.lstat(name, dir_fd=parent).st_mode):
            os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


def _mtime(t: float) -> int:
    """A file's mtime as py-rattler's extract sets it (read off its output, tests/test_worker_feed.py): whole
    seconds, rounded half to even; before 1980-01-01 (the zip epoch, 315532800) or past the ustar header's reach
    (8**11 s), 1980-01-01."""
    t = round(t)
    return t if 315532800 <= t < 8 ** 11 else 315532800


def _unpack_tar(archive: Path, stream, at: _Folders, admit, view: memoryview, folders: dict, stopped) -> None:
    """One decompressed inner tar: tarfile reads the headers (forward only, as inspect does), the files' bytes go
    from STREAM through VIEW; each member once ADMIT passed it, made in its folder's descriptor (AT); folders'
    modes are set once all is unpacked (FOLDERS, the last mode named for each)."""
    import tarfile
    with tarfile.open(fileobj=_Forward(stream), mode="r:") as t:
        for _, m in _sized(t):
            if stopped():
                raise Stopped()
            parts = admit(m)
            if m.isdir():
                at.folder(parts)
                folders[tuple(parts)] = m.mode & 0o777
                continue
            parent, leaf = at.folder(parts[:-1]), parts[-1]
            _clear(leaf, parent)
            if m.issym():
                os.symlink(m.linkname, leaf, dir_fd=parent)
                continue
            if m.islnk():  # its target: a file this tar made already, reached without a link on the way
                source = _parts(archive, m.linkname[2:] if m.linkname.startswith("./") else m.linkname)
                held = at.walk(source[:-1])
                try:
                    os.link(source[-1], leaf, src_dir_fd=held, dst_dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(held)
                os.utime(leaf, (_mtime(m.mtime),) * 2, dir_fd=parent, follow_symlinks=False)  # its own, as rattler
                continue
            stream.seek(m.offset_data)
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            try:
                left = m.size
                while left:
                    if stopped():
                        raise Stopped()
                    got = stream.readinto(view[:min(len(view), left)])
                    if not got:
                        raise EOFError(f"the archive ends inside {'/'.join(parts)}")
                    block = view[:got]
                    while block:
                        block = block[os.write(fd, block):]
                    left -= got
                os.fchmod(fd, m.mode & 0o777)
                os.utime(fd, (_mtime(m.mtime),) * 2)
            finally:
                os.close(fd)


def inspect(archive: Path) -> dict:
    """The containment check (see the module's docstring).  Returns {"unpacked_bytes", "link_scripts",
    "softlinks", "paths", "placeholder" (the shortest binary prefix placeholder, or None), "entries" (its
    info/paths.json entries)}; raises UnsafePackageError for a package that would write outside the prefix."""
    import tarfile
    import zipfile

    import zstandard
    links: dict[str, str] = {}
    names: list[str] = []
    size = 0
    own_paths = None  # info/paths.json, read on the way (the archive is streamed once)
    try:
        for t, m in _members(archive):
            name = m.name[2:] if m.name.startswith("./") else m.name
            if name == "info/paths.json" and m.isfile() and own_paths is None:
                own_paths = json.load(t.extractfile(m))
            _refuse(archive, name, m)
            names.append(name)
            if m.issym():
                links[posixpath.normpath(name)] = m.linkname
            size += max(m.size, 0)
    except UnsafePackageError:
        raise
    except (OSError, EOFError, ValueError, RecursionError, zipfile.BadZipFile, tarfile.TarError,
            zstandard.ZstdError, *_codec_errors()) as exc:  # RecursionError: json's, an info/paths.json nested "[[[…"
        raise IntegrityError(f"{archive.name}: the archive cannot be read", why=str(exc) or type(exc).__name__,
                             fix="Delete the package cache entry (the data dir's pkgs/) and rerun.")
    for name in names:  # once every link is known (one may come after the files below it in the tar)
        through = _through_link(name, links)
        if through:
            raise _unsafe(archive, f"its member {name!r} is written through the link {through}",
                          why="a file below a symbolic link the package makes lands wherever that link points")
    if not isinstance(own_paths, dict):
        own_paths = paths_json(archive)  # raises IntegrityError: the package has none
    entries = own_paths.get("paths", [])
    if not isinstance(entries, list):
        raise IntegrityError(f"{archive.name}: its info/paths.json has no list of paths",
                             fix="Delete the package cache entry (the data dir's pkgs/) and rerun.")
    scripts = []
    for e in entries:
        rel = e.get("_path") if isinstance(e, dict) else None
        if not isinstance(rel, str) or _outside(rel):
            raise _unsafe(archive, f"its info/paths.json names {rel!r}",
                          why="an entry outside the environment (absolute, .., or not a path)")
        through = _through_link(rel, links)
        if through:
            raise _unsafe(archive, f"its info/paths.json names {rel!r}, below the link {through}",
                          why="a file below a symbolic link lands wherever that link points")
        if LINK_SCRIPT.match(rel):
            scripts.append(rel)
    return {"unpacked_bytes": size, "link_scripts": scripts, "softlinks": links,
            "paths": sorted({posixpath.normpath(e["_path"]) for e in entries}),
            "placeholder": binary_placeholder_length(entries), "entries": entries}


def check_together(inspected: dict[str, dict]) -> None:
    """Across the packages of one environment: no package writes through a link another one makes."""
    links = {link: target for info in inspected.values() for link, target in info["softlinks"].items()}
    maker = {link: name for name, info in inspected.items() for link in info["softlinks"]}
    if not links:
        return
    for name, info in inspected.items():
        for rel in info["paths"]:
            through = _through_link(rel, links)
            if through:
                raise UnsafePackageError(
                    f"{name}: its file {rel} would be written through {through}, a link {maker[through]} makes",
                    why="a file below a symbolic link lands wherever that link points; lorastrap links no package "
                        "that writes outside its environment",
                    fix="Nothing was installed. Remove one of the two packages from the lock, or report it.")
