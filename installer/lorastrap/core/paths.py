"""Where lorastrap keeps things on a machine, and where its own data (envs/, verify_lora.py) lives.

From a checkout (an editable install, or PYTHONPATH=installer) the data is the repository's own `envs/` and
`scripts/`; an installed wheel carries a copy under `lorastrap/_data/`.
"""

from __future__ import annotations

import os
from pathlib import Path


_PACKAGE = Path(__file__).resolve().parent.parent  # core/ → the lorastrap package
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
# In the embedded engine's package cache: .DIST.partial.HOST.PID.d, a package being unpacked (then renamed to DIST)
PARTIAL = ".partial."
DEPLOY = _DATA / "deploy"  # the fleet tools: ansible/fleet_report.py, slurm/lorastrap-fleet.sbatch


def _folder(variable: str, value: str, fix: str) -> Path:
    """A folder named by an environment variable: absolute, and not something else (a file)."""
    from lorastrap.core.errors import UsageError  # here: install/ahead.py imports this module before the rest
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # ~nosuchuser/...: no such user's home
        raise UsageError(f"{variable}={value!r} names no home folder", why=str(exc), fix=fix) from None
    if not path.is_absolute():
        raise UsageError(f"{variable}={value!r} is not an absolute path",
                         why="a relative path would point somewhere else from every folder lorastrap is run in",
                         fix=fix)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{variable}={value!r} is not a folder", why="a file is in the way", fix=fix)
    above = path
    while not above.exists() and above.parent != above:
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{variable}={value!r} cannot become a folder", why=f"{above} is a file, not a folder",
                         fix=fix)
    return path


def data_dir() -> Path:
    """$LORASTRAP_HOME, else $XDG_DATA_HOME/lorastrap, else ~/.local/share/lorastrap (each checked: absolute, a
    folder or nothing yet)."""
    if os.environ.get("LORASTRAP_HOME"):
        return _folder("LORASTRAP_HOME", os.environ["LORASTRAP_HOME"],
                       "Set LORASTRAP_HOME to an absolute folder (for example $HOME/.local/share/lorastrap).")
    if os.environ.get("XDG_DATA_HOME"):
        return _folder("XDG_DATA_HOME", os.environ["XDG_DATA_HOME"],
                       "Set XDG_DATA_HOME to an absolute folder, unset it, or set LORASTRAP_HOME.") / "lorastrap"
    home = os.environ.get("HOME", "")
    if not home or not Path(home).is_absolute():
        from lorastrap.core.errors import UsageError
        raise UsageError(f"HOME={home!r} is not a home folder", why="the default data dir is $HOME/.local/share/"
                         "lorastrap, and without a home it would land at the filesystem's root",
                         fix="Set HOME, or set LORASTRAP_HOME to an absolute folder.")
    return _folder("HOME", home, "Set HOME to your home folder, or set LORASTRAP_HOME.") / ".local" / "share" / "lorastrap"


def envs_dir() -> Path:
    return data_dir() / "envs"


def cache_dir() -> Path:
    """The package cache: $LORASTRAP_PKGS_DIR (e.g. one folder on a shared filesystem for many nodes), else
    the data dir's pkgs/."""
    if os.environ.get("LORASTRAP_PKGS_DIR"):
        return _folder("LORASTRAP_PKGS_DIR", os.environ["LORASTRAP_PKGS_DIR"],
                       "Set LORASTRAP_PKGS_DIR to an absolute folder, or unset it (the data dir's pkgs/).")
    return data_dir() / "pkgs"


def check_prefix_path(prefix: Path) -> Path:
    """A --prefix any command may take: not the filesystem's root, no control characters (a newline breaks every
    activation script and record), not a symbolic-link loop.  Raises UsageError; returns PREFIX."""
    from lorastrap.core.errors import UsageError
    fix = "Choose another --prefix (or --name)."
    if prefix.parent == prefix:
        raise UsageError(f"--prefix {prefix} is the filesystem's root", why="an environment is a folder of its own",
                         fix=fix)
    bad = next((c for c in str(prefix) if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise UsageError(f"--prefix {str(prefix)!r} holds the control character {bad!r}",
                         why="shells, activation scripts and conda's records cannot carry it", fix=fix)
    try:
        prefix.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python 3.11), ELOOP after
        raise UsageError(f"--prefix {prefix} cannot be resolved", why=f"a symbolic-link loop ({exc})", fix=fix)
    return prefix

