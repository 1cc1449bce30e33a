"""The one way uv is found: the `uv` wheel in lorastrap's runtime (requirements.txt pins it), else a uv on PATH
(shim folders skipped).  Locking needs it (``require``); the pip step of an install falls back to pip without it."""

from __future__ import annotations

import os
import sys

from lorastrap.core import fsutil
from lorastrap.core.errors import ConfigError


def find() -> str | None:
    """The wheel's binary: where it puts it in a venv, the runtime's own bin/ (the first place its find_uv_bin()
    looks, read without importing it: that import, sysconfig with it, cost an install's pip step ~5 ms), else
    wherever find_uv_bin() finds it, else PATH."""
    in_runtime = os.path.join(sys.prefix, "bin", "uv")
    if sys.prefix != sys.base_prefix and os.path.isfile(in_runtime) and os.access(in_runtime, os.X_OK):
        return in_runtime
    try:
        import uv  # the PyPI wheel: a binary and find_uv_bin()
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return fsutil.on_path("uv")


def require() -> str:
    exe = find()
    if exe is None:
        raise ConfigError("uv is not installed in lorastrap's runtime", why="pip: entries are resolved with uv",
                          fix="Reinstall lorastrap's runtime from requirements.txt (it pins uv).")
    return exe
