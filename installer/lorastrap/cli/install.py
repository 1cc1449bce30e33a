"""`lorastrap install` (plan, then the install transaction, then the report) and `lorastrap verify`."""

from __future__ import annotations

from pathlib import Path

from lorastrap.cli import base, remembered
from lorastrap.cli.base import emit, say
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("install", parents=[common, where, sources, transaction, machine],
                       help="install the chosen profile's locked environment (atomically) and verify it")
    p.add_argument("--profile", default=None, help="force a profile (default: the one plan chooses)")
    p.add_argument("--frozen", action="store_true", help="install only from a committed lock; never re-lock")
    p.add_argument("--keep-backup", action="store_true", help="keep the previous environment as PREFIX.lorastrap-backup")
    p.add_argument("--min-free-mib", type=base.count(0), default=512, help="disk to keep free beyond what the install needs")
    p.add_argument("--yes", "-y", action="store_true", help="never ask (lorastrap does not ask anyway)")
    p.add_argument("--report", type=base.path_arg, default=None, help="also write the JSON result to this file")
    p.add_argument("--bundle", type=base.path_arg, default=None, help="install from an offline bundle (folder or .tar)")

    p = sub.add_parser("verify", parents=[common, where],
                       help="prove an environment loads a model in 8 bits and LoRA-trains it")
    p.add_argument("--steps", type=base.count(1), default=10, help="LoRA optimizer steps")
    p.add_argument("--report", type=base.path_arg, default=None, help="also write the JSON report to this file")

    return {"install": cmd_install, "verify": cmd_verify}


def cmd_install(args) -> int:
    from lorastrap.care import activate
    from lorastrap.install import provision, transaction
    base.report_target(args.report)
    prefix = transaction.check_prefix(base.prefix(args), say)
    done = provision.provision(prefix=prefix, envs_dir=base.envs_dir(args), envs_dir_given=bool(args.envs_dir),
                               machine=base.machine(args), profile=args.profile, asked_profile=bool(args.profile),
                               bundle=args.bundle,
                               **base.sources(args), engine=args.engine, frozen=args.frozen,
                               keep_backup=args.keep_backup, wait=not args.no_wait, run_verify=not args.no_verify,
                               link_mode=args.link_mode or "hardlink", min_free_mib=args.min_free_mib, narrate=say)
    result, doc = done.result, done.report.model_dump(mode="json")
    base.write_report(args.report, doc)
    state = "installed and verified" if result.changed and result.verify else (
        "installed" if result.changed else "already up to date")
    emit(args, doc, f"{state}: {result.prefix} (profile {result.profile}, {result.packages} conda + "
                  f"{result.pip_packages} pip packages, engine {result.engine}, "
                  f"{result.timings.get('total', 0):.1f} s)\n"
                  + activate.usage_hint(Path(result.prefix)))
    return errors.OK


def cmd_verify(args) -> int:
    from lorastrap.matrix import profiles
    from lorastrap.install import verify
    from lorastrap.machine.detect import detect
    prefix = base.prefix(args)
    base.report_target(args.report)
    remembered.apply(args, prefix, ("envs_dir",))
    machine = detect(disk_path=prefix)
    say(f"verifying {prefix} (8-bit load + LoRA training on a tiny local model)")
    report = verify.as_result(verify.report(prefix, matrix=profiles.load(base.envs_dir(args)),
                                            driver_cuda=machine.cuda, steps=args.steps))
    base.write_report(args.report, report)
    emit(args, report, verify.summary(report))
    return verify.exit_code(report)
