"""Using an environment without conda: its activation as a shell script (`shell-hook`), a command run inside it
(`run`), an activated interactive shell (`shell`).

Activation is what `conda activate` does for a prefix, written here (py-rattler's activation needs py-rattler in the
lorastrap process, which it must not be): PATH gets PREFIX/bin first, CONDA_PREFIX and CONDA_DEFAULT_ENV are set,
the variables in conda-meta/state (`env_vars`, as `conda env config vars set` writes them) are exported, then every
etc/conda/activate.d script for the shell is sourced in name order (`*.sh` for bash, zsh and posix sh, `*.fish`
for fish) — CUDA packages set their variables there.

`run` replaces the lorastrap process with `sh -c '<activation>; exec "$@"' CMD ARGS…`, so CMD is the process that
was started: stdin, stdout, the exit code and every signal (Ctrl-C, SIGTERM) are CMD's own, with nothing in between.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from lorastrap.core import fsutil, paths, subproc
from lorastrap.install import prefix as pfx
from lorastrap.core.errors import CMD_NOT_FOUND, LorastrapError, NoEnvError, UsageError

SHELLS = ("bash", "zsh", "fish", "posix")
MARKER = "# lorastrap activation"


def require_env(prefix: Path) -> Path:
    """PREFIX as an existing conda environment, or a clear error."""
    if not prefix.exists():
        raise NoEnvError(f"no environment at {prefix}",
                         why="nothing was installed there (or it was uninstalled)",
                         fix="`lorastrap list` shows the environments lorastrap manages; install one with "
                             "`lorastrap install` (or pass --prefix / --name).")
    if not pfx.is_conda_env(prefix):
        raise NoEnvError(f"{prefix} is not a conda environment (no conda-meta/)",
                         fix="Pass the path of a conda environment with --prefix, or a name with --name.")
    return prefix


def _state_vars(prefix: Path) -> dict[str, str]:
    """conda-meta/state's env_vars (conda's per-environment variables)."""
    try:
        state = json.loads((prefix / "conda-meta" / "state").read_text())
        return {str(k): str(v) for k, v in (state.get("env_vars") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _sq(text: str) -> str:
    """A single-quoted word for sh."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def default_shell() -> str:
    name = Path(os.environ.get("SHELL", "")).name
    return name if name in SHELLS else "posix"


def script(prefix: Path, shell: str) -> str:
    """The activation script for SHELL (to eval, or to source)."""
    if shell not in SHELLS:
        raise UsageError(f"unknown shell {shell!r}", fix=f"Use one of: {', '.join(SHELLS)}.")
    variables = {"CONDA_PREFIX": str(prefix), "CONDA_DEFAULT_ENV": prefix.name, **_state_vars(prefix)}
    hooks = sorted((prefix / "etc" / "conda" / "activate.d").glob("*.fish" if shell == "fish" else "*.sh"))
    bin_dir = str(prefix / "bin")
    if shell == "fish":
        lines = [f"set -gx PATH {_fish_q(bin_dir)} $PATH"]
        lines += [f"set -gx {k} {_fish_q(v)}" for k, v in variables.items()]
        lines += [f"source {_fish_q(str(h))}" for h in hooks]
    else:
        lines = [f"export PATH={_sq(bin_dir)}\"${{PATH:+:$PATH}}\""]
        lines += [f"export {k}={_sq(v)}" for k, v in variables.items()]
        lines += [f". {_sq(str(h))}" for h in hooks]
    return f"{MARKER} of {prefix} ({shell})\n" + "\n".join(lines) + "\n"


def _sh() -> str:
    return shutil.which("sh") or "/bin/sh"


def run(prefix: Path, argv: list[str]) -> None:
    """Become ARGV, run inside the activated PREFIX (never returns)."""
    require_env(prefix)
    if not argv:
        raise UsageError("no command to run", fix="Give it after --, e.g. `lorastrap run -- python train.py`.")
    search = f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    if "/" not in argv[0] and shutil.which(argv[0], path=search) is None:
        raise LorastrapError(f"command not found: {argv[0]}", exit_code=CMD_NOT_FOUND,
                             why=f"it is neither in {prefix / 'bin'} nor on your PATH",
                             fix="Check the name, or install the package that provides it into the environment.")
    code = script(prefix, "posix") + 'exec "$@"\n'
    subproc.become([_sh(), "-c", code, "lorastrap-run", *argv])


def shell_argv(prefix: Path, shell: str) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment of an interactive SHELL that starts activated in PREFIX."""
    activation = script(prefix, shell)
    if shell == "fish":
        return [shutil.which("fish") or "fish", "--init-command", activation], {}
    rc_dir = paths.data_dir() / "shell"
    rc_dir.mkdir(parents=True, exist_ok=True)
    home = Path.home()
    if shell == "bash":
        rc = rc_dir / "bashrc"
        fsutil.write_atomic(rc, f'[ -f {_sq(str(home / ".bashrc"))} ] && . {_sq(str(home / ".bashrc"))}\n'
                                + activation)
        return [shutil.which("bash") or "bash", "--rcfile", str(rc), "-i"], {}
    if shell == "zsh":  # zsh reads $ZDOTDIR/.zshrc: ours sources the user's, then activates
        user = Path(os.environ.get("ZDOTDIR") or home)
        zdot = rc_dir / "zsh"
        zdot.mkdir(exist_ok=True)
        fsutil.write_atomic(zdot / ".zshrc", f"ZDOTDIR={_sq(str(user))}\n"
                                             f"[ -f {_sq(str(user / '.zshrc'))} ] && . {_sq(str(user / '.zshrc'))}\n"
                                             + activation)
        return [shutil.which("zsh") or "zsh", "-i"], {"ZDOTDIR": str(zdot)}
    rc = rc_dir / "profile.sh"
    fsutil.write_atomic(rc, activation)
    return [_sh(), "-i"], {"ENV": str(rc)}


def shell(prefix: Path, shell_name: str | None) -> None:
    """Become an interactive shell activated in PREFIX (never returns)."""
    require_env(prefix)
    argv, extra = shell_argv(prefix, shell_name or default_shell())
    print(f"lorastrap: a {Path(argv[0]).name} shell in {prefix}; `exit` leaves it", file=sys.stderr, flush=True)
    subproc.become(argv, extra_env=extra)


def usage_hint(prefix: Path) -> str:
    """The two lines `install` and `setup.sh` end with: how to use the environment."""
    in_data_dir = prefix.parent == paths.envs_dir().absolute()
    where = "" if in_data_dir and prefix.name == "lora" else (
        f" --name {prefix.name}" if in_data_dir else f" --prefix {prefix}")
    from lorastrap.core.invocation import command
    ls = command()
    return (f"run in it:   {ls} run{where} -- python train.py\n"
            f"activate it: eval \"$({ls} shell-hook{where})\"   (or: {ls} shell{where})")
