"""The command line: parse flags, call one plain function, print the result, map errors to exit codes.

stdout carries results (JSON with --json); stderr carries narration and errors.  No traceback unless --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from installer import errors
from installer.errors import LorastrapError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--envs-dir", type=Path, default=None,
                   help="folder with profiles.yaml and the profiles' specs and locks (default: envs/ of the checkout)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in errors.EXIT_CODES.items())
    top = argparse.ArgumentParser(prog="python -m installer",
                                  description="lorastrap: detect the machine, choose and install a locked "
                                              "LoRA + 8-bit environment, verify it.",
                                  epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("detect", help="what this machine has (GPUs, driver, CUDA, platform)")
    _common(p)
    p.add_argument("--prefix", type=Path, default=None, help="where the environment will go (for free disk)")

    p = sub.add_parser("plan", help="which environment profile fits this machine, and why")
    _common(p)
    p.add_argument("--profile", default=None, help="force a profile; the plan says which requirements it breaks")
    p.add_argument("--why-not", default=None, metavar="NAME", help="list each rule of profile NAME and whether it is met")
    return top


def cmd_detect(args) -> int:
    from installer.detect import detect, format_table
    machine = detect(disk_path=args.prefix)
    print(machine.model_dump_json(indent=2) if args.json else format_table(machine))
    return errors.OK


def cmd_plan(args) -> int:
    from installer import plan as planner, profiles
    from installer.detect import detect
    matrix = profiles.load(args.envs_dir)
    if args.why_not:
        profiles.get(matrix, args.why_not)
    machine = detect()
    result = planner.plan(machine, matrix, profile=args.profile)
    if args.json:
        print(json.dumps({"machine": machine.model_dump(mode="json"), "plan": result.model_dump(mode="json")}, indent=2))
    else:
        print(planner.format_plan(result, why_not=args.why_not))
    return errors.OK if result.profile else errors.NO_PROFILE


COMMANDS = {"detect": cmd_detect, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not args.command:
        p.print_help(sys.stderr)
        return errors.USAGE
    debug = getattr(args, "debug", False) or os.environ.get("LORASTRAP_DEBUG") == "1"
    try:
        return COMMANDS[args.command](args)
    except LorastrapError as exc:
        if debug:
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
    except Exception as exc:  # a bug: say so plainly
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(exc).__name__}: {exc}\n"
              f"  fix: this is a bug in lorastrap; rerun with --debug and report the output", file=sys.stderr)
        return errors.INTERNAL
