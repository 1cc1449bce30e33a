"""The one place versions are read, by what is compared:

- dotted numbers (``parse`` / ``key``): a driver's CUDA (12.4), a compute capability (8.9), glibc or macOS (2.17,
  14.0) — machine facts and virtual packages;
- PyPI versions (``pypi``): packaging's PEP 440 ``Version`` — pip entries, engine releases (2.0 == 2.0.0);
- conda versions (``conda``): rattler's ``Version``, conda's own ordering (1.0a < 1.0, 2.0.post1 > 2.0) — conda
  packages of a lock.

``compare`` picks by the manager a lock entry names.  A user-given value that is not a version (e.g.
CONDA_OVERRIDE_CUDA=12.x) is refused with what / why / fix, as an input error, never an internal one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lorastrap.core.errors import UsageError

if TYPE_CHECKING:
    from packaging.version import Version

PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")  # ASCII digits only: \d also matches fullwidth and other scripts' digits


def parse(text: str, what: str = "version") -> tuple[int, ...]:
    """'12.4' → (12, 4).  Raises UsageError naming ``what`` for anything that is not dotted numbers."""
    text = str(text).strip()
    if not PATTERN.fullmatch(text):
        raise UsageError(f"{what}={text!r} is not a version", why="expected dotted ASCII numbers, such as 12.4",
                         fix=f"Give {what} as MAJOR.MINOR (for example 12.4), or leave it unset.")
    return tuple(int(p) for p in text.split("."))


def key(text: str) -> tuple[int, ...]:
    """A sort key for values already known to be versions (e.g. validated by a model's pattern)."""
    return parse(text)


def pypi(text: str) -> Version:
    """A PEP 440 version; raises packaging's InvalidVersion for one that is not.  (packaging is imported here: the
    dotted numbers that detection and the plan compare need none of it.)"""
    from packaging.version import Version
    return Version(str(text))


def conda(text: str):
    """A conda version with conda's ordering (rattler's Version, imported here: only what compares conda needs it)."""
    from lorastrap.core.fsutil import sound_cwd
    with sound_cwd():  # py-rattler asks for the current folder when imported
        from rattler import Version as CondaVersion
    return CondaVersion(str(text))


def compare(a: str, b: str, manager: str = "conda") -> int:
    """-1, 0, 1 as version a is older, the same as, newer than b: conda's ordering for conda packages, PEP 440 for
    pip ones (conda's ordering for a pip version PEP 440 cannot read)."""
    if manager == "pip":
        from packaging.version import InvalidVersion
        try:
            va, vb = pypi(a), pypi(b)
            return (va > vb) - (va < vb)
        except InvalidVersion:
            pass
    ca, cb = conda(a), conda(b)
    return (ca > cb) - (ca < cb)
