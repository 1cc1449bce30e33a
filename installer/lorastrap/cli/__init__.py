"""The command line: parse flags, call one plain function, print the result, map errors to exit codes.

One module per command group — machine (detect, plan), locking (lock, diff-locks), install (install, verify), care
(doctor, explain, repair, list, update, rollback, uninstall, self uninstall), use (run, shell-hook, shell), fleet
(bundle, fleet) — each registering its flags and holding its commands; what they share is in base.py.  A command
imports the rooms it uses when it runs, so start-up pays only for argparse.

stdout carries results (JSON with --json); stderr carries narration and errors.  No traceback unless --debug.

May import: fleet, care, install, locking, matrix, machine, core (a command imports only what it uses).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from lorastrap import __version__
from lorastrap.cli import base
from lorastrap.core import errors
from lorastrap.core.errors import LorastrapError

GROUPS = ("machine", "locking", "install", "care", "use", "fleet")  # the order of `lorastrap --help`
# Which group holds each command: a run builds (and imports) only its command's group; --help, no command or an
# unknown one build them all.  tests/test_startup.py checks this table against the groups.
COMMANDS = {"detect": "machine", "plan": "machine", "lock": "locking", "diff-locks": "locking",
            "install": "install", "verify": "install", "doctor": "care", "explain": "care", "repair": "care",
            "list": "care", "update": "care", "rollback": "care", "uninstall": "care", "self": "care",
            "run": "use", "shell-hook": "use", "shell": "use", "bundle": "fleet", "fleet": "fleet"}


def _command(argv: list[str]) -> str | None:
    """The command named in argv (the first word that is not a flag), when the top level has nothing else."""
    for word in argv:
        if word in ("-h", "--help", "--version"):
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser (only the named command's group when argv names one; else all), and command name → the function
    that runs it."""
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in errors.EXIT_CODES.items())
    top = base.Parser(prog="lorastrap",
                      description="lorastrap: detect the machine, choose and install a locked LoRA + 8-bit "
                                  "environment, verify it.",
                      epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"lorastrap {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=base.Parser)
    parents = base.parents()
    commands: dict = {}
    command = _command(argv or [])
    for name in (COMMANDS[command],) if command else GROUPS:
        commands.update(importlib.import_module(f"lorastrap.cli.{name}").add(sub, parents))
    return top, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # answered before any parser is built
        print(f"lorastrap {__version__}")
        return errors.OK
    p, commands = parser(argv)
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except LorastrapError as exc:
        print(exc.render(), file=sys.stderr)
        if "--json" in argv:
            print(json.dumps(exc.to_dict(), indent=2))
        return exc.exit_code
    if not args.command:
        p.print_help(sys.stderr)
        return errors.USAGE
    debug = getattr(args, "debug", False) or os.environ.get("LORASTRAP_DEBUG") == "1"
    interrupted = _watch_interrupts()
    try:
        return commands[args.command](args)
    except LorastrapError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        print(exc.render(), file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(exc.to_dict(), indent=2))
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return errors.INTERRUPTED
    except BrokenPipeError:
        return errors.OK
    except BaseException as exc:  # SystemExit passes; a Ctrl-C that landed in a native module's start-up is still one
        if isinstance(exc, SystemExit) or not (interrupted or isinstance(exc, Exception)):
            raise
        if interrupted:
            print("interrupted", file=sys.stderr)
            return errors.INTERRUPTED
        if debug:
            import traceback
            traceback.print_exc()
        from lorastrap.core.fsutil import cwd_removed
        if isinstance(exc, FileNotFoundError) and cwd_removed():  # a relative path met a removed current folder
            usage = errors.UsageError(f"the current folder no longer exists: it was removed ({exc})",
                                      why="a relative path is resolved from the current folder, which no longer "
                                          "exists",
                                      fix="cd to a folder that exists (or give absolute paths) and run it again.")
            print(usage.render(), file=sys.stderr)
            if getattr(args, "json", False):
                print(json.dumps(usage.to_dict(), indent=2))
            return usage.exit_code
        print(f"error: internal error: {type(exc).__name__}: {exc}\n"
              f"  fix: this is a bug in lorastrap; rerun with --debug and report the output", file=sys.stderr)
        return errors.INTERNAL


def _watch_interrupts() -> list:
    """Ctrl-C raises KeyboardInterrupt as always, and is also noted: one that lands while a native extension starts
    (pydantic_core or py-rattler, both pyo3) surfaces as that extension's own error (a pyo3 panic, an ImportError)
    instead, and is still answered "interrupted".  datetime, which pydantic_core imports as it starts, is imported
    first, so an interrupt cannot cut that import short inside the extension."""
    __import__("datetime")
    import signal
    seen: list = []
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        def on_sigint(signum, frame):
            seen.append(signum)
            raise KeyboardInterrupt
        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (a test calling main()): the default handler stays
            pass
    return seen


def run() -> None:
    """The console script `lorastrap` (and `python -m lorastrap`).  It flushes and leaves with os._exit, skipping
    the interpreter's teardown of its modules (~30 ms after an install: nothing in it is lorastrap's work — every
    file a command writes is closed by then, every child waited for).  And py-rattler may crash at interpreter
    shutdown after its work succeeded (locking/rattler_worker.py): a run that loaded it in this process (a solve)
    must not reach that teardown, so the exit code is the command's."""
    import lorastrap
    lorastrap.ENGINE_EXITS_HARD = True
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C before a command runs (while its modules are imported): no traceback
        print("interrupted", file=sys.stderr)
        code = errors.INTERRUPTED
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (a closed pipe): nothing more to say
            pass
    os._exit(code)
