"""Day two: `doctor`, `explain`, `repair`, `list`, `update`, `rollback`, `uninstall`, `self uninstall`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lorastrap.cli import base, remembered
from lorastrap.cli.base import emit, say
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("doctor", parents=[common, anywhere, machine],
                       help="diagnose an environment (conda, venv, or any Python): files, lock, pip, the machine, "
                            "imports")
    p.add_argument("--no-imports", action="store_true", help="skip the import and version-gate pre-checks")

    p = sub.add_parser("explain", parents=[common, anywhere, machine],
                       help="explain an error message or traceback: which known failure, which cause here, the fix")
    p.add_argument("source", nargs="?", default=None, metavar="FILE | - | TEXT",
                   help="the error: a file (a training log), - for stdin, or the message itself")
    p.add_argument("--facts", type=Path, default=None,
                   help="judge by this environment description (the `environment` of `explain --json` run elsewhere)")
    p.add_argument("--no-env", action="store_true",
                   help="judge by the text alone, not by the active environment ($VIRTUAL_ENV, $CONDA_PREFIX, the "
                        "python on PATH) explain otherwise uses when it has the stack installed")

    p = sub.add_parser("repair", parents=[common, where, machine, sources, transaction],
                       help="rebuild a broken environment through the install transaction (keeps a backup)")
    p.add_argument("--replan", action="store_true", help="rebuild with the profile plan chooses now")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (also when stdin is not a terminal)")
    p.add_argument("--drop-backup", action="store_true", help="remove the old environment once the new one verified")

    sub.add_parser("list", parents=[common],
                   help="the environments lorastrap manages here: profile, lock, size, health, generations")

    p = sub.add_parser("update", parents=[common, where, sources, transaction],
                       help="lock the profile again, show what changes, install it (the old one kept for rollback)")
    p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    p.add_argument("--profile", default=None, help="move to another profile (default: the environment's own)")
    p.add_argument("--keep-generations", type=base.count(0), default=1, metavar="N",
                   help="previous environments to keep for rollback (default 1; 0 keeps none)")
    p.add_argument("--min-free-mib", type=base.count(0), default=512, help="disk to keep free beyond what the install needs")

    p = sub.add_parser("rollback", parents=[common, where],
                       help="make the previous generation current again (the current one becomes the previous)")
    p.add_argument("--no-wait", action="store_true", help="fail at once if another run holds the prefix")

    p = sub.add_parser("uninstall", parents=[common, where],
                       help="remove an environment, its generations and its records")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (also when stdin is not a terminal)")
    p.add_argument("--no-wait", action="store_true", help="fail at once if another run holds the prefix")

    p = sub.add_parser("self", help="lorastrap itself: `lorastrap self uninstall`")
    selfsub = p.add_subparsers(dest="self_command", metavar="uninstall", required=True)
    p = selfsub.add_parser("uninstall", parents=[common],
                           help="remove lorastrap: its environments, runtime, data dir, launcher and PATH line")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")

    return {"doctor": cmd_doctor, "explain": cmd_explain, "repair": cmd_repair, "list": cmd_list,
            "update": cmd_update, "rollback": cmd_rollback, "uninstall": cmd_uninstall, "self": cmd_self}


def cmd_doctor(args) -> int:
    from lorastrap.care import doctor
    prefix, python = base.anywhere(args)
    prefix = None if python else prefix or base.prefix(args)
    remembered.apply(args, prefix, ("envs_dir",))
    diag = doctor.diagnose(prefix, python=python, envs_dir=base.envs_dir(args),
                           machine=base.machine(args), imports=not args.no_imports)
    emit(args, diag.to_dict(), doctor.format_diagnosis(diag))
    return diag.exit_code


def cmd_explain(args) -> int:
    from lorastrap.care import explain
    text = explain.read_text(args.source, sys.stdin)
    prefix, python = base.anywhere(args)
    diag, found_by = None, None
    if not (prefix or python or args.facts or args.no_env):
        active = explain.active_environment(os.environ)
        if active:
            prefix, python, found_by = active
            say(f"judging by {found_by}: {prefix or python} (--no-env to judge by the text alone)")
    if prefix or python:
        if args.facts:
            raise errors.UsageError("--facts and an environment (--prefix, --name, --python) exclude each other",
                                    fix="Pass one: the environment here, or a description recorded elsewhere.")
        say("checking the environment (imports, version gates, pip check)")
        result, diag = explain.explain_in(text, prefix=prefix, python=python, envs_dir=base.envs_dir(args),
                                          machine=base.machine(args))
        result["environment_from"] = found_by and f"{found_by}: {prefix or python}"
    else:
        facts = explain.read_facts(args.facts) if args.facts else None
        result = explain.explain(text, table=explain.load(base.envs_dir(args)), facts=facts)
        result["environment"] = facts.model_dump() if facts else None
    emit(args, result, explain.format_explanation(result, diag))
    return errors.OK if result["known"] else errors.EXPLAIN_UNKNOWN


def cmd_repair(args) -> int:
    from lorastrap.care import doctor
    prefix = base.prefix(args)
    remembered.apply(args, prefix)
    diag, result = doctor.repair(
        prefix, envs_dir=base.envs_dir(args), machine=base.machine(args), replan=args.replan, yes=args.yes,
        keep_backup=not args.drop_backup, confirm=base.confirm, wait=not args.no_wait, narrate=say, engine=args.engine,
        run_verify=not args.no_verify, link_mode=remembered.link_mode(args),
        allow_link_scripts=args.allow_link_scripts, **base.sources(args))
    emit(args, {"before": diag.to_dict(), "result": result.to_dict()},
         f"repaired: {result.prefix} (profile {result.profile}, {result.packages} conda + {result.pip_packages} "
         f"pip packages); " + (f"previous environment kept at {result.backup}" if result.backup else
                               "the replaced environment was removed once the new one verified"))
    return errors.OK


def cmd_list(args) -> int:
    from lorastrap.care import envs
    from lorastrap.core import paths
    rows = envs.list_all()
    emit(args, {"data_dir": str(paths.data_dir()), "environments": rows}, envs.format_list(rows))
    return errors.OK


def cmd_update(args) -> int:
    from lorastrap.locking import diff as lockdiff
    from lorastrap.care import update
    from lorastrap.install import generations
    from lorastrap.matrix import profiles
    from lorastrap.machine.detect import detect
    prefix = base.prefix(args)
    remembered.apply(args, prefix)
    machine = detect(disk_path=prefix)
    src = base.sources(args)
    result = update.update(prefix=prefix, envs_dir=base.envs_dir(args), matrix=profiles.load(base.envs_dir(args), keep=True),
                           profile_name=args.profile, channels=src["channels"],
                           mirror=src["mirror"], pip_index_url=src["pip_index_url"], dry_run=args.dry_run,
                           keep_generations=args.keep_generations, engine=args.engine, run_verify=not args.no_verify,
                           wait=not args.no_wait, min_free_mib=args.min_free_mib, driver_cuda=machine.cuda,
                           link_mode=remembered.link_mode(args), allow_link_scripts=args.allow_link_scripts,
                           narrate=say)
    if result.changed:
        generations.register(prefix)
    kept = sum(g["bytes"] for g in result.generations)
    head = (f"{'would change' if args.dry_run else 'changes'} in {prefix} (profile {result.profile}, "
            f"{result.platform}): {len(result.changes) or 'none'}")
    tail = ("\nalready up to date" if not result.changes else "\n(dry run: nothing changed)" if args.dry_run else
            f"\nupdated; previous generations kept: {len(result.generations)} ({kept / 2**20:.1f} MiB) — "
            f"`lorastrap rollback` returns to the previous one")
    emit(args, result.to_dict(), head + "\n" + lockdiff.format_changes(result.changes) + tail)
    return errors.OK


def cmd_rollback(args) -> int:
    from lorastrap.locking import diff as lockdiff
    from lorastrap.care import update
    prefix = base.prefix(args)
    result = update.rollback(prefix, wait=not args.no_wait, narrate=say)
    emit(args, result.to_dict(),
         f"rolled back {prefix}: now profile {result.now.get('profile', '-')} installed "
         f"{result.now.get('installed_at', '-')}; the replaced one is the previous generation "
         f"(`lorastrap rollback` again returns to it)\n" + lockdiff.format_changes(result.changes)
         + f"\nhealth: {result.health}")
    return errors.OK


def cmd_uninstall(args) -> int:
    from lorastrap.care import envs
    prefix = base.prefix(args)

    def ask(what: str) -> None:
        print(f"lorastrap: {what}", file=sys.stderr)
        if not base.confirm("uninstall"):
            raise errors.UsageError(f"uninstall declined: {prefix} was not removed",
                                    fix="Run again and answer y, or pass --yes.")

    done = envs.uninstall(prefix, wait=not args.no_wait, narrate=say, confirm=None if args.yes else ask)
    if not done["removed"] and done["dropped_from_registry"] and not done["removed_generations"]:
        emit(args, done, f"{prefix} is not lorastrap's any more: dropped from the registry, nothing deleted")
        return errors.OK
    emit(args, done, f"removed {prefix} and {done['removed_generations']} previous generation(s), "
                     f"{done['freed_bytes'] / 2**20:.1f} MiB freed")
    return errors.OK


def cmd_self(args) -> int:
    from lorastrap.care import envs
    held = envs.holdings()
    print("lorastrap: self uninstall removes:\n" + envs.format_holdings(held), file=sys.stderr, flush=True)
    if not args.yes:
        if not sys.stdin.isatty():
            raise errors.UsageError("self uninstall needs --yes when it cannot ask",
                                    why="stdin is not a terminal", fix="Run `lorastrap self uninstall --yes`.")
        if not base.confirm():
            raise errors.UsageError("self uninstall declined: nothing was removed",
                                    fix="Run again and answer y, or pass --yes.")
    envs.self_uninstall(narrate=say)
    emit(args, held, "lorastrap is uninstalled")
    return errors.OK
