"""The one platform table: each conda platform (subdir) lorastrap knows, with the names other tools give it.

- ``uname``: (platform.system(), platform.machine()) pairs, lower case, that detect maps onto it — an explicit
  list: anything else is "unsupported";
- ``wheel_arch``: the CPU in a wheel's platform tag (PEP 425/600: manylinux_2_17_x86_64, macosx_11_0_arm64);
- ``uv_arch``: the CPU in uv's --python-platform target triple (``uv pip compile --help``: aarch64-apple-darwin,
  x86_64-manylinux_2_28); None where uv has no target for it;
- ``triplet``: the Debian/Ubuntu multiarch folder the loader searches (/usr/lib/x86_64-linux-gnu).
"""

from __future__ import annotations

from lorastrap.core.plain import Struct, frozen_struct


@frozen_struct
class Platform(Struct):
    subdir: str
    os: str  # conda's name: linux, osx, win
    uname: tuple[tuple[str, str], ...]
    wheel_arch: str | None
    uv_arch: str | None = None
    triplet: str | None = None


PLATFORMS = {p.subdir: p for p in (
    Platform("linux-64", "linux", (("linux", "x86_64"), ("linux", "amd64")), "x86_64", "x86_64", "x86_64-linux-gnu"),
    Platform("linux-aarch64", "linux", (("linux", "aarch64"), ("linux", "arm64")), "aarch64", "aarch64",
             "aarch64-linux-gnu"),
    Platform("linux-ppc64le", "linux", (("linux", "ppc64le"),), "ppc64le", None, "powerpc64le-linux-gnu"),
    Platform("osx-arm64", "osx", (("darwin", "arm64"),), "arm64", "aarch64"),
    Platform("osx-64", "osx", (("darwin", "x86_64"),), "x86_64", "x86_64"),
    Platform("win-64", "win", (("windows", "amd64"), ("windows", "x86_64")), None),
    Platform("win-arm64", "win", (("windows", "arm64"),), None),
)}
OS_NAMES = {"linux": "linux", "darwin": "osx", "windows": "win"}  # platform.system(), lower case → conda's name


def get(subdir: str) -> Platform | None:
    return PLATFORMS.get(subdir)


def for_host(system: str, machine: str) -> Platform | None:
    """The conda platform of a uname pair (lower case), or None when lorastrap knows none."""
    return next((p for p in PLATFORMS.values() if (system, machine) in p.uname), None)


def triplet(machine: str) -> str | None:
    """The multiarch folder name of a Linux CPU (platform.machine()), or None."""
    p = for_host("linux", machine)
    return p.triplet if p else None
