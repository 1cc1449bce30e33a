"""What every command shares: the argument parser whose errors are lorastrap's, the shared flags (parent parsers),
narration, where an environment is (--prefix / --name / --python), the sources (--channel / --mirror /
--pip-index-url), the machine (--machine or detection), reports and results (stdout; JSON with --json)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorastrap.core import errors

ENGINES = ["auto", "micromamba", "mamba", "rattler"]  # engines.CHOICES (not imported here: start-up time)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are lorastrap's (what / why / fix, exit 2, JSON under --json)."""

    def error(self, message: str):
        raise errors.UsageError(f"{self.prog}: {message}",
                                why="the command line is checked before anything is done; nothing was changed",
                                fix=f"See `{self.prog} --help`.")


def count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def path_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def parents() -> dict[str, argparse.ArgumentParser]:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--envs-dir", type=Path, default=None,
                        help="folder with profiles.yaml and the profiles' specs and locks (default: lorastrap's envs/)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    where = Parser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--prefix", type=path_arg, default=None, help="environment path")
    group.add_argument("--name", default=None, help="environment name under the data dir's envs/ (default: lora)")

    sources = Parser(add_help=False)
    sources.add_argument("--channel", action="append", default=None,
                         help="channel URL, name or path to lock from (repeatable; replaces the spec's channels)")
    sources.add_argument("--mirror", action="append", default=None, metavar="[CHANNEL=]URL",
                         help="a mirror of a channel of the lock (http(s), file:// or a path): CHANNEL=URL for one "
                              "channel (repeatable), or URL alone for a lock of a single channel")
    sources.add_argument("--pip-index-url", default=None, help="PyPI-compatible index for pip: entries")

    transaction = Parser(add_help=False)
    transaction.add_argument("--engine", choices=ENGINES, default=None,
                             help="auto (micromamba or mamba when found, else the embedded py-rattler) | micromamba | "
                                  "mamba | rattler (default: $LORASTRAP_ENGINE, else auto)")
    transaction.add_argument("--no-verify", action="store_true",
                             help="skip the verification run (the smoke test still runs)")
    transaction.add_argument("--no-wait", action="store_true", help="fail at once if another run holds the prefix")
    transaction.add_argument("--allow-link-scripts", action="store_true",
                             help="install packages that carry link scripts (refused by default): the embedded engine "
                                  "still never runs them, micromamba/mamba do")
    transaction.add_argument("--link-mode", choices=["hardlink", "copy"], default=None,
                             help="hardlink: files shared with the package cache (conda's default; fast, no extra "
                                  "disk); copy: each file the environment's own (a reflink where the filesystem has "
                                  "them), for environments whose files you edit (default: hardlink; update and repair: as the "
                                  "environment was built)")

    anywhere = Parser(add_help=False)  # any Python environment, not only conda ones
    group = anywhere.add_mutually_exclusive_group()
    group.add_argument("--prefix", type=path_arg, default=None, help="environment path: a conda environment or a venv")
    group.add_argument("--name", default=None, help="environment name under the data dir's envs/")
    group.add_argument("--python", type=path_arg, default=None, metavar="PATH",
                       help="any Python interpreter (the one your training runs with)")

    machine = Parser(add_help=False)
    machine.add_argument("--machine", type=path_arg, default=None,
                         help="judge against this machine description (`detect --json` of another node) instead of "
                              "detecting this one")
    return {"common": common, "where": where, "anywhere": anywhere, "sources": sources, "transaction": transaction,
            "machine": machine}


def say(msg: str) -> None:
    """Narration on stderr (LORASTRAP_QUIET=1 silences it; errors and results are still printed)."""
    if not os.environ.get("LORASTRAP_QUIET"):
        from lorastrap.core.invocation import runnable
        print(f"lorastrap: {runnable(msg)}", file=sys.stderr, flush=True)


def envs_dir(args) -> Path:
    from lorastrap.core import paths
    return (args.envs_dir or paths.ENVS).absolute()


def prefix(args) -> Path:
    from lorastrap.core import paths
    name = "lora" if args.name is None else args.name
    if not args.prefix and (name in ("", ".", "..") or "/" in name or "\0" in name):
        raise errors.UsageError(f"--name {name!r} is not an environment name",
                                why=f"a name is one folder under {paths.envs_dir()}; it cannot be empty or hold / or ..",
                                fix="Give a plain name (for example lora), or --prefix PATH for another place.")
    from lorastrap.core import invocation
    invocation.set_where(["--prefix", str(args.prefix.absolute())] if args.prefix else
                         ["--name", args.name] if args.name else [])
    return paths.check_prefix_path((args.prefix or paths.envs_dir() / name).absolute())


def anywhere(args) -> tuple[Path | None, Path | None]:
    """--prefix / --name / --python: (prefix, python); both None when none was given."""
    if args.python:
        from lorastrap.core import invocation
        invocation.set_where(["--python", str(args.python.absolute())])
        return None, args.python
    return (prefix(args) if args.prefix or args.name else None), None


def write_report(path: Path | None, doc: dict) -> None:
    from lorastrap.core import fsutil
    if path is None:
        return
    try:
        fsutil.write_atomic(path, json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise errors.NotWritableError(f"--report {path} could not be written", why=exc.strerror or str(exc),
                                      fix="The work itself is done; rerun with a writable --report path (a no-op "
                                          "for install).")


def report_target(path: Path | None) -> None:
    """--report: checked before any work, so a bad path cannot fail after the environment changed."""
    if path is None:
        return
    if path.is_dir() or not path.parent.is_dir():
        raise errors.UsageError(f"--report {path}: " + ("a folder" if path.is_dir() else f"{path.parent} does not exist"),
                                why="the report is a file written into an existing folder",
                                fix="Name a file in an existing folder.")


def sources(args) -> dict:
    """--channel / --mirror / --pip-index-url as the lock and install functions take them: the channels to lock
    from (a mirror stands in for the spec's channel) and where to fetch the locked archives."""
    from lorastrap.locking import channels
    bare, by_channel = mirrors(args.mirror or [])
    for flag, values, index in (("--channel", args.channel or [], False), ("--mirror", [bare], False),
                                ("--mirror", list(by_channel.values()), False),
                                ("--pip-index-url", [args.pip_index_url], True)):
        for v in values:
            if v is not None:
                channels.check_source(v, flag, index=index)
    return {"channels": args.channel or ([bare] if bare else None),
            "mirror": by_channel or bare or (args.channel[0] if args.channel else None),
            "pip_index_url": args.pip_index_url or channels.DEFAULT_PIP_INDEX}


def mirrors(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """--mirror values: one bare URL, or CHANNEL=URL pairs (the = before any ://)."""
    bare, pairs = [], {}
    for v in values:
        key, eq, url = v.partition("=")
        is_pair = eq and url and "?" not in key and (
            ("://" not in key and not key.startswith(("/", "."))) or ("://" in key and "://" in url))
        if is_pair:
            pairs[key.strip()] = url.strip()
        else:
            bare.append(v)
    if len(bare) > 1 or (bare and pairs):
        raise errors.UsageError("--mirror URL alone can be given once, and not with CHANNEL=URL",
                                why="a mirror without its channel stands for every channel of the lock",
                                fix="Name the channel each mirror stands for: --mirror conda-forge=URL "
                                    "--mirror nvidia=URL2.")
    return (bare[0] if bare else None), pairs


MACHINE_MAX_BYTES = 1 << 20  # a `detect --json` is a few KiB


def machine(args):
    from lorastrap.machine.detect import detect
    from lorastrap.machine.model import Machine
    if getattr(args, "machine", None):
        from lorastrap.core.errors import ConfigError
        try:
            if not args.machine.is_file():
                raise OSError(f"{args.machine} is not a regular file")
            with open(args.machine, "rb") as f:
                text = f.read(MACHINE_MAX_BYTES + 1)
            if len(text) > MACHINE_MAX_BYTES:
                raise ValueError(f"larger than {MACHINE_MAX_BYTES // 1024} KiB")
            return Machine.model_validate_json(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{args.machine}: not a machine description", why=str(exc).splitlines()[0],
                              fix="Pass the output of `lorastrap detect --json`.")
    return detect(disk_path=getattr(args, "prefix", None))


def emit(args, doc: dict, text: str) -> None:
    """The result: JSON with --json, else the text; every quoted `lorastrap …` command in it (a fix, a hint) as
    the user runs it, with the --prefix/--name they gave (core/invocation.py)."""
    from lorastrap.core.invocation import runnable
    print(json.dumps(_runnable_fixes(doc, runnable), indent=2) if args.json else runnable(text))


def _runnable_fixes(doc, runnable):
    if isinstance(doc, dict):
        return {k: runnable(v) if k == "fix" and isinstance(v, str) else _runnable_fixes(v, runnable)
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_runnable_fixes(v, runnable) for v in doc]
    return doc


def confirm(command: str = "repair") -> bool:
    """Ask on the terminal; without one (scripts, cron, cluster jobs) a destructive command needs --yes."""
    if not sys.stdin.isatty():
        raise errors.UsageError(f"{command} needs --yes when it cannot ask",
                                why="stdin is not a terminal, and it changes or removes an environment",
                                fix=f"Run `lorastrap {command} ... --yes` once you are sure.")
    return input("lorastrap: go ahead? [y/N] ").strip().lower() in ("y", "yes")
