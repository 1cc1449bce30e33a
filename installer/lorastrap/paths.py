"""Where lorastrap keeps things on a machine, and where its own data (envs/, verify_lora.py) lives.

From a checkout (an editable install, or PYTHONPATH=installer) the data is the repository's own `envs/` and
`scripts/`; an installed wheel carries a copy under `lorastrap/_data/`.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent.parent  # installer/lorastrap/ → the repository root

if (_CHECKOUT / "envs" / "profiles.yaml").is_file() and (_CHECKOUT / "setup.sh").is_file():
    ROOT: Path | None = _CHECKOUT  # the checkout: setup.sh, envs/, scripts/ (bundles copy it)
    _DATA = _CHECKOUT
else:
    ROOT = None
    _DATA = _PACKAGE / "_data"

ENVS = _DATA / "envs"  # the compatibility matrix and the profiles' specs and locks
SCRIPTS = _DATA / "scripts"
VERIFY_SCRIPT = SCRIPTS / "verify_lora.py"
REQUIREMENTS = _DATA / "requirements.txt"  # lorastrap's own runtime, hash-pinned
DEPLOY = _DATA / "deploy"  # the fleet tools: ansible/fleet_report.py, slurm/lorastrap-fleet.sbatch


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
