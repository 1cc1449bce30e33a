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

from lorastrap import __version__, errors
from lorastrap.errors import LorastrapError

ENGINES = ["auto", "micromamba", "mamba", "rattler"]  # engines.CHOICES (not imported here: start-up time)


# --------------------------------------------------------------------------------------------------------------
# Shared options (parent parsers)

def _parents() -> dict[str, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--envs-dir", type=Path, default=None,
                        help="folder with profiles.yaml and the profiles' specs and locks (default: lorastrap's envs/)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--prefix", type=Path, default=None, help="environment path")
    group.add_argument("--name", default=None, help="environment name under the data dir's envs/ (default: lora)")

    sources = argparse.ArgumentParser(add_help=False)
    sources.add_argument("--channel", action="append", default=None,
                         help="channel URL, name or path to lock from (repeatable; replaces the spec's channels)")
    sources.add_argument("--mirror", default=None, help="a mirror of the lock's channel (http(s), file:// or a path)")
    sources.add_argument("--pip-index-url", default=None, help="PyPI-compatible index for pip: entries")

    transaction = argparse.ArgumentParser(add_help=False)
    transaction.add_argument("--engine", choices=ENGINES, default=None,
                             help="auto (micromamba or mamba when found, else the embedded py-rattler) | micromamba | "
                                  "mamba | rattler (default: $LORASTRAP_ENGINE, else auto)")
    transaction.add_argument("--no-verify", action="store_true",
                             help="skip the verification run (the smoke test still runs)")
    transaction.add_argument("--no-wait", action="store_true", help="fail at once if another run holds the prefix")

    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--machine", type=Path, default=None,
                         help="judge against this machine description (`detect --json` of another node) instead of "
                              "detecting this one")
    return {"common": common, "where": where, "sources": sources, "transaction": transaction, "machine": machine}


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in errors.EXIT_CODES.items())
    top = argparse.ArgumentParser(prog="lorastrap",
                                  description="lorastrap: detect the machine, choose and install a locked "
                                              "LoRA + 8-bit environment, verify it.",
                                  epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"lorastrap {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    pp = _parents()
    common, where, sources, transaction, machine = (pp[k] for k in ("common", "where", "sources", "transaction",
                                                                    "machine"))

    p = sub.add_parser("detect", parents=[common], help="what this machine has (GPUs, driver, CUDA, platform)")
    p.add_argument("--prefix", type=Path, default=None, help="where the environment will go (for free disk)")

    p = sub.add_parser("plan", parents=[common], help="which environment profile fits this machine, and why")
    p.add_argument("--profile", default=None, help="force a profile; the plan says which requirements it breaks")
    p.add_argument("--why-not", default=None, metavar="NAME", help="list each rule of profile NAME and whether it is met")

    p = sub.add_parser("lock", parents=[common, sources], help="solve a profile's spec and write its conda-lock file")
    p.add_argument("--profile", default=None, help="profile to lock (default: the one plan chooses)")
    p.add_argument("--platform", action="append", default=None,
                   help="conda platform to lock for (repeatable; default: all of the profile's platforms)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write (default: envs/PROFILE.conda-lock.yml)")

    p = sub.add_parser("install", parents=[common, where, sources, transaction],
                       help="install the chosen profile's locked environment (atomically) and verify it")
    p.add_argument("--profile", default=None, help="force a profile (default: the one plan chooses)")
    p.add_argument("--frozen", action="store_true", help="install only from a committed lock; never re-lock")
    p.add_argument("--keep-backup", action="store_true", help="keep the previous environment as PREFIX.lorastrap-backup")
    p.add_argument("--min-free-mib", type=int, default=512, help="disk to keep free beyond what the install needs")
    p.add_argument("--yes", "-y", action="store_true", help="never ask (lorastrap does not ask anyway)")
    p.add_argument("--report", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--bundle", type=Path, default=None, help="install from an offline bundle (folder or .tar)")

    p = sub.add_parser("bundle", parents=[common, sources],
                       help="an offline bundle: lock, archives, runtime wheels, source, manifest")
    p.add_argument("--profile", default=None, help="profile (default: the one plan chooses)")
    p.add_argument("--platform", default=None, help="target conda platform (default: this machine's)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder, or a file ending in .tar")
    p.add_argument("--python-version", default=None, help="the nodes' Python for the runtime wheels (default: this one)")

    p = sub.add_parser("verify", parents=[common, where],
                       help="prove an environment loads a model in 8 bits and LoRA-trains it")
    p.add_argument("--steps", type=int, default=10, help="LoRA optimizer steps")
    p.add_argument("--report", type=Path, default=None, help="also write the JSON report to this file")

    p = sub.add_parser("doctor", parents=[common, where, machine],
                       help="diagnose an environment: files, lock, pip on top, the machine, imports")
    p.add_argument("--no-imports", action="store_true", help="skip the import and version-gate pre-checks")

    p = sub.add_parser("repair", parents=[common, where, machine, sources, transaction],
                       help="rebuild a broken environment through the install transaction (keeps a backup)")
    p.add_argument("--replan", action="store_true", help="rebuild with the profile plan chooses now")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (also when stdin is not a terminal)")
    p.add_argument("--drop-backup", action="store_true", help="remove the old environment once the new one verified")
    return top


def say(msg: str) -> None:
    """Narration on stderr (LORASTRAP_QUIET=1 silences it; errors and results are still printed)."""
    if not os.environ.get("LORASTRAP_QUIET"):
        print(f"lorastrap: {msg}", file=sys.stderr, flush=True)


def _envs_dir(args) -> Path:
    from lorastrap import paths
    return (args.envs_dir or paths.ENVS).absolute()


def _prefix(args) -> Path:
    from lorastrap import paths
    return (args.prefix or paths.envs_dir() / (args.name or "lora")).absolute()


def _sources(args) -> dict:
    """--channel / --mirror / --pip-index-url as the lock and install functions take them: the channels to lock
    from (a mirror stands in for the spec's channel) and where to fetch the locked archives."""
    from lorastrap import lock
    return {"channels": args.channel or ([args.mirror] if args.mirror else None),
            "mirror": args.mirror or (args.channel[0] if args.channel else None),
            "pip_index_url": args.pip_index_url or lock.DEFAULT_PIP_INDEX}


def _machine(args):
    from lorastrap.detect import Machine, detect
    if getattr(args, "machine", None):
        from lorastrap.errors import ConfigError
        try:
            return Machine.model_validate_json(args.machine.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{args.machine}: not a machine description", why=str(exc).splitlines()[0],
                              fix="Pass the output of `lorastrap detect --json`.")
    return detect(disk_path=getattr(args, "prefix", None))


def _print(args, doc: dict, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


# --------------------------------------------------------------------------------------------------------------
# Commands

def cmd_detect(args) -> int:
    from lorastrap.detect import detect, format_table
    machine = detect(disk_path=args.prefix)
    print(machine.model_dump_json(indent=2) if args.json else format_table(machine))
    return errors.OK


def cmd_plan(args) -> int:
    from lorastrap import plan as planner, profiles
    from lorastrap.detect import detect
    matrix = profiles.load(args.envs_dir)
    if args.why_not:
        profiles.get(matrix, args.why_not)
    machine = detect()
    result = planner.plan(machine, matrix, profile=args.profile)
    _print(args, {"machine": machine.model_dump(mode="json"), "plan": result.model_dump(mode="json")},
           planner.format_plan(result, why_not=args.why_not))
    return errors.OK if result.profile else errors.NO_PROFILE


def cmd_lock(args) -> int:
    from lorastrap import lock, plan as planner, profiles
    from lorastrap.detect import detect
    envs = _envs_dir(args)
    matrix = profiles.load(envs)
    name = args.profile or planner.require_profile(planner.plan(detect(), matrix))
    src = _sources(args)
    out = lock.lock(envs_dir=envs, name=name, profile=profiles.get(matrix, name), platforms=args.platform,
                    channels=src["channels"], out=args.output, pip_index_url=src["pip_index_url"], narrate=say)
    written = lock.read_lock(out)
    result = {"profile": name, "lock": str(out), "platforms": written.platforms,
              "packages": {p: len(written.for_platform(p)) for p in written.platforms}}
    _print(args, result, f"wrote {out} (" + ", ".join(f"{p}: {n} packages" for p, n in result["packages"].items()) + ")")
    return errors.OK


def cmd_install(args) -> int:
    from lorastrap import bundle, install as inst, plan as planner, profiles
    from lorastrap.detect import detect
    from lorastrap.errors import NoProfileError
    envs = _envs_dir(args)
    opened = bundle.open_bundle(args.bundle) if args.bundle else None
    if opened and not args.envs_dir:
        envs = opened / "envs"  # the profiles the bundle was made from
    matrix = profiles.load(envs)
    machine = detect(disk_path=args.prefix)
    if machine.platform is None:
        raise NoProfileError(f"this platform ({machine.os}/{machine.arch}) is not supported",
                             fix="lorastrap runs on linux-64, linux-aarch64, osx-arm64 and osx-64; on Windows, run "
                                 "it inside WSL2.")
    lock_file = None
    profile = args.profile
    if opened:
        profile, lock_file = bundle.install_inputs(opened, machine)
        say(f"installing from bundle {opened} (profile {profile}, no network)")
    result_plan = planner.plan(machine, matrix, profile=profile)
    name = planner.require_profile(result_plan)
    for c in result_plan.broken:
        say(f"warning: {name} breaks a requirement here: {c.message}")
    prefix = _prefix(args)
    say(f"profile {name} for {machine.platform}" + (" (forced)" if result_plan.forced else "") + f" → {prefix}")
    result = inst.install(
        prefix=prefix, envs_dir=envs, name=name, profile=profiles.get(matrix, name), matrix=matrix,
        platform=machine.platform, lock_file=lock_file, engine=args.engine, frozen=args.frozen, **_sources(args),
        keep_backup=args.keep_backup, wait=not args.no_wait, run_verify=not args.no_verify,
        min_free_mib=args.min_free_mib, driver_cuda=machine.cuda, narrate=say,
        plan_info=result_plan.model_dump(mode="json", include={"profile", "forced", "reasons", "warnings"}))
    doc = inst.node_report(result, machine).model_dump(mode="json")
    if args.report:
        args.report.write_text(json.dumps(doc, indent=2) + "\n")
    state = "installed and verified" if result.changed and result.verify else (
        "installed" if result.changed else "already up to date")
    _print(args, doc, f"{state}: {result.prefix} (profile {result.profile}, {result.packages} conda + "
                      f"{result.pip_packages} pip packages, engine {result.engine}, "
                      f"{result.timings.get('total', 0):.1f} s)\n"
                      f"activate with: {inst.activation_hint(Path(result.prefix))}")
    return errors.OK


def cmd_bundle(args) -> int:
    from lorastrap import bundle, lock, plan as planner, profiles
    from lorastrap.detect import detect
    envs = _envs_dir(args)
    matrix = profiles.load(envs)
    machine = detect()
    name = args.profile or planner.require_profile(planner.plan(machine, matrix))
    profile = profiles.get(matrix, name)
    platform = args.platform or machine.platform
    src = _sources(args)
    lk = lock.choose(envs_dir=envs, name=name, profile=profile, platform=platform, frozen=False,
                     channels=src["channels"], pip_index_url=src["pip_index_url"], narrate=say)
    out = args.output.absolute()
    manifest = bundle.make(envs_dir=envs, name=name, lock_file=lk, platform=platform, out=out, mirror=args.mirror,
                           virtual_packages=lock.virtual_packages(envs, profile, platform),
                           python_version=args.python_version, narrate=say)
    summary = {"profile": manifest.profile, "platform": manifest.platform, "python_version": manifest.python_version,
               "packages": manifest.packages, "bytes": manifest.bytes, "path": str(out)}
    _print(args, summary, f"bundle {out}: profile {name} for {platform}, {manifest.packages} packages, "
                          f"{manifest.bytes / 2**20:.1f} MiB; install on a node with: "
                          + (f"tar -xf {out} -C {out.parent} && " if out.suffix == ".tar" else "")
                          + f"sh {out.with_suffix('') if out.suffix == '.tar' else out}/source/setup.sh --bundle {out}")
    return errors.OK


def cmd_verify(args) -> int:
    from lorastrap import profiles, verify
    from lorastrap.detect import detect
    prefix = _prefix(args)
    machine = detect(disk_path=prefix)
    say(f"verifying {prefix} (8-bit load + LoRA training on a tiny local model)")
    report = verify.report(prefix, matrix=profiles.load(_envs_dir(args)), driver_cuda=machine.cuda, steps=args.steps)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    _print(args, report, verify.summary(report))
    return verify.exit_code(report)


def cmd_doctor(args) -> int:
    from lorastrap import doctor
    diag = doctor.diagnose(_prefix(args), envs_dir=_envs_dir(args), machine=_machine(args), imports=not args.no_imports)
    _print(args, diag.to_dict(), doctor.format_diagnosis(diag))
    return diag.exit_code


def cmd_repair(args) -> int:
    from lorastrap import doctor

    def confirm() -> bool:
        if not sys.stdin.isatty():
            return True  # non-interactive (cluster jobs, pipes): never prompt
        return input("lorastrap: go ahead? [y/N] ").strip().lower() in ("y", "yes")

    diag, result = doctor.repair(
        _prefix(args), envs_dir=_envs_dir(args), machine=_machine(args), replan=args.replan, yes=args.yes,
        keep_backup=not args.drop_backup, confirm=confirm, wait=not args.no_wait, narrate=say, engine=args.engine,
        run_verify=not args.no_verify, **_sources(args))
    _print(args, {"before": diag.to_dict(), "result": result.to_dict()},
           f"repaired: {result.prefix} (profile {result.profile}, {result.packages} conda + {result.pip_packages} "
           f"pip packages); previous environment kept at {result.backup or 'nowhere (--drop-backup)'}")
    return errors.OK


COMMANDS = {"detect": cmd_detect, "plan": cmd_plan, "lock": cmd_lock, "install": cmd_install, "verify": cmd_verify,
            "bundle": cmd_bundle, "doctor": cmd_doctor, "repair": cmd_repair}


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


def run() -> None:
    """The console script `lorastrap` (and `python -m lorastrap`)."""
    sys.exit(main())
