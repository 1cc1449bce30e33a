"""Which wheels a profile's machines can install: the platform tags its virtual packages admit (``wheel_platforms``)
and, with its Python, the full tag list in pip's priority order (``supported_tags``, from ``packaging.tags`` as pip
builds it); a wheel is installable when one of its tags is in that list, and of several files the one whose best tag
ranks first is chosen (``rank``).

packaging's manylinux generator reads the running machine's glibc, so the manylinux platform names (PEP 600, newest
first, each legacy alias right after its manylinux_2_N, as packaging orders them) are listed here from the profile's
__glibc; the macOS ones come from ``packaging.tags.mac_platforms`` for the profile's __osx.
"""

from __future__ import annotations

import re

from packaging import tags as pytags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from lorastrap.core import versions
from lorastrap.core.errors import ConfigError, UsageError
from lorastrap.machine import platforms

# PEP 600: the legacy manylinux names are aliases of manylinux_2_5, _2_12 and _2_17.
LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}


def _release(value: str, what: str) -> tuple[int, int]:
    try:
        numbers = versions.parse(value, what)
    except UsageError:
        raise ConfigError(f"virtual package {what}={value!r} is not a version", fix=f"Give {what} as MAJOR.MINOR.")
    return numbers[0], (numbers[1] if len(numbers) > 1 else 0)


def wheel_platforms(platform: str, vps: dict[str, str]) -> list[str]:
    """The wheel platform tags a machine admitted by these virtual packages can install, best first.

    Linux: manylinux_2_N for every N from the profile's __glibc down to 5 (and their legacy aliases), then
    linux_ARCH; macOS: packaging's list for the profile's __osx (universal2 and, on Intel, the fat variants too).
    A wheel that needs more than the profile's minimum is not one it may lock."""
    known = platforms.get(platform)
    arch = known.wheel_arch if known else None
    if arch is None:
        raise ConfigError(f"no wheel tags for platform {platform}", fix="Lock pip: entries for a supported platform.")
    if known.os == "linux":
        if "__glibc" not in vps:
            raise ConfigError(f"the virtual packages for {platform} have no __glibc",
                              why="the manylinux tags of pip: wheels derive from the profile's glibc minimum",
                              fix="Add __glibc to the profile's virtual-packages file.")
        major, minor = _release(vps["__glibc"], "__glibc")
        tags = []
        for n in range(minor if major == 2 else 0, 4, -1):
            tags.append(f"manylinux_2_{n}_{arch}")
            if n in LEGACY_MANYLINUX:
                tags.append(f"{LEGACY_MANYLINUX[n]}_{arch}")
        return tags + [f"linux_{arch}"]
    if "__osx" not in vps:
        raise ConfigError(f"the virtual packages for {platform} have no __osx",
                          why="the macosx tags of pip: wheels derive from the profile's macOS minimum",
                          fix="Add __osx to the profile's virtual-packages file.")
    return list(pytags.mac_platforms(_release(vps["__osx"], "__osx"), arch))


def supported_tags(pyver: str, plats: list[str]) -> list[pytags.Tag]:
    """Every tag a CPython PYVER (e.g. '3.12') on these platforms installs, in pip's order of preference."""
    major, minor = (int(x) for x in pyver.split(".")[:2])
    interpreter = f"cp{major}{minor}"
    return (list(pytags.cpython_tags((major, minor), [interpreter], plats))
            + list(pytags.compatible_tags((major, minor), interpreter, plats)))


def rank(filename: str, supported: list[pytags.Tag]) -> int | None:
    """The position of this wheel's best tag in SUPPORTED (lower is preferred), None when no tag is supported."""
    try:
        wheel_tags = parse_wheel_filename(filename)[3]
    except InvalidWheelFilename:
        return None
    order = {t: i for i, t in enumerate(supported)}
    return min((order[t] for t in wheel_tags if t in order), default=None)


def wheel_installable(filename: str, pyver: str, plats: list[str]) -> bool:
    """Whether some tag of this wheel is installable on every machine the profile admits."""
    return rank(filename, supported_tags(pyver, plats)) is not None


def platform_needs(filename: str) -> str:
    """What a wheel's platform tags ask of the machine, in virtual-package words (for messages)."""
    try:
        _, _, _, wheel_tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return "an unreadable wheel name"
    needs = set()
    for t in wheel_tags:
        if m := re.match(r"manylinux_(\d+)_(\d+)_", t.platform):
            needs.add(f"__glibc >= {m.group(1)}.{m.group(2)}")
        elif m := re.match(r"macosx_(\d+)_(\d+)_", t.platform):
            needs.add(f"__osx >= {m.group(1)}.{m.group(2)}")
        elif t.platform != "any":
            needs.add(t.platform)
    return " or ".join(sorted(needs, key=_need_key)) or "any platform"


def _need_key(text: str) -> tuple:
    """'__glibc >= 2.28' sorts by name, then by version (2.9 before 2.28)."""
    name, _, minimum = text.partition(" >= ")
    return (name, versions.key(minimum) if minimum else ())


def for_platform(filename: str, platform: str) -> bool:
    """Whether a wheel is built for this conda platform's OS and CPU at all (whatever its minimum)."""
    known = platforms.get(platform)
    arch = (known.wheel_arch if known else None) or ""
    os_tag = "linux" if platform.startswith("linux") else "macosx"
    try:
        wheel_tags = parse_wheel_filename(filename)[3]
    except InvalidWheelFilename:
        return False
    return any(t.platform == "any" or (os_tag in t.platform and t.platform.endswith(arch)) for t in wheel_tags)
