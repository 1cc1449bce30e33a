"""The one version parser: dotted numbers such as a driver's CUDA (12.4), a compute capability (8.9) or glibc (2.17).

Anything else is refused with what / why / fix (a user-given value such as CONDA_OVERRIDE_CUDA=12.x is an input
error, never an internal one).
"""

from __future__ import annotations

import re

from lorastrap.core.errors import UsageError

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
