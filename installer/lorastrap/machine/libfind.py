"""Find a shared library the way the dynamic loader would, without loading it and without starting a process.

detect asks this before it starts a probe child: on a machine where neither libnvidia-ml.so.1 nor libcuda.so.1
can be found, no child is started at all.  The search follows ld.so(8): the directories in LD_LIBRARY_PATH, then
/etc/ld.so.cache (parsed here; ``ldconfig -p`` prints the same list), then the default directories; then the
folders conda and rattler also try by absolute path (``/usr/lib64/nvidia``, ``/usr/lib/<triplet>``), and under
WSL2 ``/usr/lib/wsl/lib``, where the Windows driver puts its libraries and which is not always on the loader's path
(pixi#1355, conda#11615).  A candidate counts only if it is an ELF file of this interpreter's class and machine (the
loader skips the others, e.g. a 32-bit copy in a multilib folder).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

from lorastrap.core.plain import Struct, frozen_struct
from lorastrap.machine import host, platforms

CACHE_MAGIC = b"glibc-ld.so.cache1.1"
OLD_MAGIC = b"ld.so-1.7.0"


@frozen_struct
class Found(Struct):
    path: str
    via: str  # "LD_LIBRARY_PATH", "ld.so.cache", "default directory", "extra directory"

    @property
    def loader_finds_it(self) -> bool:
        """False when a child must get the folder on its LD_LIBRARY_PATH to load it by name."""
        return self.via != "extra directory"


def cache_entries(path: Path) -> list[tuple[str, str]]:
    """(soname, path) pairs of an ld.so.cache in glibc's "new" format (alone, or after the old one)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    start = 0
    if data.startswith(OLD_MAGIC):  # old format first: nlibs, 12-byte entries, then the new one (8-aligned)
        (nlibs,) = struct.unpack_from("<I", data, len(OLD_MAGIC) + 1)
        start = len(OLD_MAGIC) + 1 + 4 + nlibs * 12
        start = data.find(CACHE_MAGIC, start)
    if start < 0 or not data.startswith(CACHE_MAGIC, start):
        return []
    # header: magic+version (20 bytes), nlibs, len_strings, flags, 3 pad, extension offset, 3 unused = 48 bytes
    (nlibs,) = struct.unpack_from("<I", data, start + 20)
    entries = []
    for k in range(nlibs):
        _flags, key, value = struct.unpack_from("<iII", data, start + 48 + k * 24)
        entries.append((_cstr(data, start + key), _cstr(data, start + value)))
    return entries


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)].decode(errors="replace")


def _elf_kind(path: str) -> tuple[int, int] | None:
    """(EI_CLASS, e_machine) of an ELF file, or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "<" if head[5] == 1 else ">"
    return head[4], struct.unpack_from(order + "H", head, 18)[0]


_OWN_KIND = _elf_kind(os.path.realpath(sys.executable))


def _usable(path: str) -> bool:
    kind = _elf_kind(path)
    return kind is not None and (_OWN_KIND is None or kind == _OWN_KIND)


def search_dirs(root: Path, *, wsl: bool) -> tuple[list[Path], list[Path]]:
    """The loader's default directories, and the folders tried by absolute path, under ``root``."""
    triplet = platforms.triplet(host.uname()[1].lower()) or ""
    default = ["lib64", "usr/lib64", "lib", "usr/lib"] + ([f"lib/{triplet}", f"usr/lib/{triplet}"] if triplet else [])
    # conda (plugins/virtual_packages/cuda.py) and rattler (rattler_virtual_packages cuda.rs) try these by path;
    # JetPack puts the driver in the tegra/nvidia subfolders (normally listed in ld.so.conf.d).
    extra = ["usr/lib64/nvidia", "usr/lib/x86_64-linux-gnu", f"usr/lib/{triplet}/tegra", f"usr/lib/{triplet}/nvidia"]
    if wsl:
        extra.append("usr/lib/wsl/lib")
    return [root / d for d in default], [root / d for d in dict.fromkeys(extra)]


def find(soname: str, *, environ: dict[str, str], root: Path = Path("/"), wsl: bool = False) -> Found | None:
    """Where the loader (or our fallback folders) would find ``soname``; None when nowhere."""
    for folder in filter(None, environ.get("LD_LIBRARY_PATH", "").split(":")):
        if _usable(os.path.join(folder, soname)):
            return Found(os.path.join(folder, soname), "LD_LIBRARY_PATH")
    for name, path in cache_entries(root / "etc" / "ld.so.cache"):
        if name == soname and _usable(str(root / path.lstrip("/"))):
            return Found(str(root / path.lstrip("/")), "ld.so.cache")
    default, extra = search_dirs(root, wsl=wsl)
    for via, folders in (("default directory", default), ("extra directory", extra)):
        for folder in folders:
            if _usable(str(folder / soname)):
                return Found(str(folder / soname), via)
    return None
