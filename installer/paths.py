"""Where lorastrap keeps things on a machine, and where its data lives in the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / "envs"  # the compatibility matrix and the profiles' specs and locks
SCRIPTS = ROOT / "scripts"


def data_dir() -> Path:
    """$LORASTRAP_HOME, else $XDG_DATA_HOME/lorastrap, else ~/.local/share/lorastrap."""
    if os.environ.get("LORASTRAP_HOME"):
        return Path(os.environ["LORASTRAP_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "lorastrap"


def envs_dir() -> Path:
    return data_dir() / "envs"


def cache_dir() -> Path:
    """The package cache: $LORASTRAP_PKGS_DIR (e.g. one folder on a shared filesystem for many nodes), else
    the data dir's pkgs/."""
    if os.environ.get("LORASTRAP_PKGS_DIR"):
        return Path(os.environ["LORASTRAP_PKGS_DIR"]).expanduser()
    return data_dir() / "pkgs"


def logs_dir() -> Path:
    return data_dir() / "logs"
