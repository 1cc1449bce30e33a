"""Using an environment: `lorastrap run -- CMD`, `lorastrap shell-hook`, `lorastrap shell`."""

from __future__ import annotations

import argparse

from lorastrap.cli import base
from lorastrap.cli.base import emit
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("run", parents=[common, where],
                       help="run a command inside the activated environment: lorastrap run -- python train.py")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command and its arguments")

    p = sub.add_parser("shell-hook", parents=[common, where],
                       help="print the activation script: eval \"$(lorastrap shell-hook)\"")
    p.add_argument("--shell", choices=["bash", "zsh", "fish", "posix"], default=None,
                   help="the shell to write it for (default: $SHELL's, else posix)")

    p = sub.add_parser("shell", parents=[common, where], help="start an interactive shell in the environment")
    p.add_argument("--shell", choices=["bash", "zsh", "fish", "posix"], default=None,
                   help="which shell (default: $SHELL's, else posix sh)")

    return {"run": cmd_run, "shell-hook": cmd_shell_hook, "shell": cmd_shell}


def cmd_run(args) -> int:
    from lorastrap.care import activate
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    activate.run(base.prefix(args), argv)  # becomes the command: returns only by raising
    return errors.INTERNAL


def cmd_shell_hook(args) -> int:
    from lorastrap.care import activate
    prefix = activate.require_env(base.prefix(args))
    shell = args.shell or activate.default_shell()
    text = activate.script(prefix, shell)
    emit(args, {"prefix": str(prefix), "shell": shell, "script": text}, text.rstrip("\n"))
    return errors.OK


def cmd_shell(args) -> int:
    from lorastrap.care import activate
    activate.shell(base.prefix(args), args.shell)
    return errors.INTERNAL
