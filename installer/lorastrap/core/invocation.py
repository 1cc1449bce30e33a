"""Fix lines that run as printed: the lorastrap command as this run was started (`lorastrap` when that is what the
PATH finds, else the launcher's path, else `PYTHON -m lorastrap`) and the environment the user named (--prefix P
or --name N), written into every `lorastrap …` command a message quotes.

The CLI says where once (``set_where``); ``runnable`` rewrites a message's backticked commands.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys

# The commands that act on one environment: a quoted one without --prefix/--name/--python gets the user's.
ENV_COMMANDS = ("repair", "doctor", "verify", "update", "rollback", "uninstall", "run", "shell-hook", "shell",
                "explain")
_where: list[str] = []
_QUOTED = re.compile(r"`lorastrap((?: [^`]*)?)`")


def set_where(flags: list[str]) -> None:
    """The environment flags the user gave (["--prefix", "/x"], ["--name", "n"], or [])."""
    _where[:] = flags


def command() -> str:
    """How to run lorastrap again from the user's shell."""
    launcher = os.environ.get("LORASTRAP_COMMAND")  # setup.sh and its launcher say how the user runs it
    on_path = shutil.which("lorastrap")
    if launcher:  # setup.sh's launcher (maybe not written yet: setup.sh writes it once the install worked)
        if "/" not in launcher or os.path.basename(launcher) != "lorastrap":
            return launcher  # `lorastrap` (its folder on the PATH), or a whole command line (scripts/try.sh's)
        return "lorastrap" if on_path and _same(on_path, launcher) else shlex.quote(launcher)
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "lorastrap" and os.path.isfile(argv0):
        if on_path and _same(on_path, argv0):
            return "lorastrap"
        return shlex.quote(os.path.abspath(argv0))
    # python -m lorastrap (argv[0] is the package's __main__.py), or embedded
    if on_path and _same(os.path.dirname(on_path), os.path.join(sys.prefix, "bin")):
        return "lorastrap"
    return f"{shlex.quote(sys.executable)} -m lorastrap"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def runnable(text: str) -> str:
    """TEXT with each backticked `lorastrap …` command as this user runs it, with their --prefix/--name."""
    if not text or "`lorastrap" not in text:
        return text
    cmd = command()

    def fix(m: re.Match) -> str:
        rest = m.group(1)
        words = rest.split()
        sub = words[0] if words else ""
        if _where and sub in ENV_COMMANDS and not {"--prefix", "--name", "--python"} & set(words):
            extra = " " + " ".join(shlex.quote(w) for w in _where)
            before, sep, after = rest.partition(" -- ")  # `lorastrap run -- CMD`: the flags go before CMD
            rest = before + extra + sep + after
        return f"`{cmd}{rest}`"

    return _QUOTED.sub(fix, text)
