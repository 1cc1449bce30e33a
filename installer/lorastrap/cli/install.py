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
    p.add_argument("--force", action="store_true",
                   help="replace a conda environment lorastrap did not make (it is kept whole as the backup)")
    p.add_argument("--report", type=base.path_arg, default=None, help="also write the JSON result to this file")
    p.add_argument("--reverify", action="store_true",
                   help="verify the environment on this machine also when it is already up to date (fleets do)")
    p.add_argument("--bundle", type=base.path_arg, default=None, help="install from an offline bundle (folder or .tar)")

    p = sub.add_parser("verify", parents=[common, where],
                       help="prove an environment loads a model in 8 bits and LoRA-trains it")
    p.add_argument("--steps", type=base.count(1), default=10, help="LoRA optimizer steps")
    p.add_argument("--report", type=base.path_arg, default=None, help="also write the JSON report to this file")

    return {"install": cmd_install, "verify": cmd_verify}


NOOP_FLAGS = ("envs_dir", "profile", "frozen", "channel", "mirror", "pip_index_url", "engine", "link_mode", "machine")


def cmd_install(args) -> int:
    import time

    from lorastrap.machine.render import summary
    t0 = time.perf_counter()
    base.report_target(args.report)
    machine = base.machine(args)
    try:
        return _install(args, machine, t0)
    except errors.LorastrapError as exc:  # the JSON error says which machine it failed on (its GPUs, its driver)
        exc.context.setdefault("machine", summary(machine))
        raise


def _install(args, machine, t0: float) -> int:
    import time

    from lorastrap.install import noop
    inputs = None
    if not args.bundle and not args.reverify:  # the quick no-op: answered from the stamp when nothing it needs moved
        doc, inputs = noop.lookup(base.prefix(args), envs_dir=base.envs_dir(args), machine=machine,
                                  flags={k: getattr(args, k, None) for k in NOOP_FLAGS})
        if doc is not None:
            doc = dict(doc, timings={"total": time.perf_counter() - t0},
                       finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            say(f"{doc['prefix']} already matches the lock ({doc['packages']} conda + {doc['pip_packages']} pip "
                f"packages, their files all there): nothing to do")
            from lorastrap.install import ahead
            ahead.discard(wait=False)  # the worker started ahead (lorastrap/__main__.py): not needed
            return _done(args, doc)
    from lorastrap.install import ahead
    ahead.start(args.engine)  # if none was started ahead (run in-process; a flag the guess did not read)
    try:
        return _provision(args, machine, inputs)
    finally:
        ahead.discard(wait=False)


def _provision(args, machine, inputs) -> int:
    from lorastrap.install import noop, provision, transaction
    prefix = transaction.check_prefix(base.prefix(args), say)
    noop.forget(prefix)
    done = provision.provision(prefix=prefix, envs_dir=base.envs_dir(args), envs_dir_given=bool(args.envs_dir),
                               machine=machine, profile=args.profile, asked_profile=bool(args.profile),
                               bundle=args.bundle, **base.sources(args), engine=args.engine, frozen=args.frozen,
                               keep_backup=args.keep_backup, wait=not args.no_wait, run_verify=not args.no_verify,
                               reverify=args.reverify, link_mode=args.link_mode or "hardlink",
                               min_free_mib=args.min_free_mib, replace_foreign=args.force,
                               allow_link_scripts=args.allow_link_scripts, narrate=say)
    doc = done.report.model_dump(mode="json")
    if inputs is not None and not done.result.repaired:
        noop.remember(prefix, inputs, doc)
    return _done(args, doc)


def _done(args, doc: dict) -> int:
    base.write_report(args.report, doc)
    if args.json:
        emit(args, doc, "")
        return errors.OK
    from lorastrap.care import activate
    state = "installed and verified" if doc["changed"] and doc["verify"] else (
        "installed" if doc["changed"] else "already up to date")
    emit(args, doc, f"{state}: {doc['prefix']} (profile {doc['profile']}, {doc['packages']} conda + "
                    f"{doc['pip_packages']} pip packages, engine {doc['engine']}, "
                    f"{doc['timings'].get('total', 0):.1f} s)\n"
                    + activate.usage_hint(Path(doc["prefix"])))
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
