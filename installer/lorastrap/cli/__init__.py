"""The command line: parse flags, call one plain function, print the result, map errors to exit codes.

stdout carries results (JSON with --json); stderr carries narration and errors.  No traceback unless --debug.

May import: fleet, care, install, locking, matrix, machine, core (a command imports only what it uses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from lorastrap import __version__
from lorastrap.core import errors
from lorastrap.core.errors import LorastrapError

ENGINES = ["auto", "micromamba", "mamba", "rattler"]  # engines.CHOICES (not imported here: start-up time)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are lorastrap's (what / why / fix, exit 2, JSON under --json)."""

    def error(self, message: str):
        raise errors.UsageError(f"{self.prog}: {message}", fix=f"See `{self.prog} --help`.")


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


# --------------------------------------------------------------------------------------------------------------
# Shared options (parent parsers)

def _parents() -> dict[str, argparse.ArgumentParser]:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("--envs-dir", type=Path, default=None,
                        help="folder with profiles.yaml and the profiles' specs and locks (default: lorastrap's envs/)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    where = _Parser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--prefix", type=_path, default=None, help="environment path")
    group.add_argument("--name", default=None, help="environment name under the data dir's envs/ (default: lora)")

    sources = _Parser(add_help=False)
    sources.add_argument("--channel", action="append", default=None,
                         help="channel URL, name or path to lock from (repeatable; replaces the spec's channels)")
    sources.add_argument("--mirror", action="append", default=None, metavar="[CHANNEL=]URL",
                         help="a mirror of a channel of the lock (http(s), file:// or a path): CHANNEL=URL for one "
                              "channel (repeatable), or URL alone for a lock of a single channel")
    sources.add_argument("--pip-index-url", default=None, help="PyPI-compatible index for pip: entries")

    transaction = _Parser(add_help=False)
    transaction.add_argument("--engine", choices=ENGINES, default=None,
                             help="auto (micromamba or mamba when found, else the embedded py-rattler) | micromamba | "
                                  "mamba | rattler (default: $LORASTRAP_ENGINE, else auto)")
    transaction.add_argument("--no-verify", action="store_true",
                             help="skip the verification run (the smoke test still runs)")
    transaction.add_argument("--no-wait", action="store_true", help="fail at once if another run holds the prefix")
    transaction.add_argument("--allow-link-scripts", action="store_true",
                             help="install packages that carry link scripts (refused by default): the embedded engine "
                                  "still never runs them, micromamba/mamba do")
    transaction.add_argument("--link-mode", choices=["hardlink", "copy"], default="hardlink",
                             help="hardlink: files shared with the package cache (conda's default; fast, no extra "
                                  "disk); copy: each file the environment's own (a reflink where the filesystem has "
                                  "them), for environments whose files you edit")

    anywhere = _Parser(add_help=False)  # any Python environment, not only conda ones
    group = anywhere.add_mutually_exclusive_group()
    group.add_argument("--prefix", type=_path, default=None, help="environment path: a conda environment or a venv")
    group.add_argument("--name", default=None, help="environment name under the data dir's envs/")
    group.add_argument("--python", type=_path, default=None, metavar="PATH",
                       help="any Python interpreter (the one your training runs with)")

    machine = _Parser(add_help=False)
    machine.add_argument("--machine", type=_path, default=None,
                         help="judge against this machine description (`detect --json` of another node) instead of "
                              "detecting this one")
    return {"common": common, "where": where, "anywhere": anywhere, "sources": sources, "transaction": transaction,
            "machine": machine}


def _fleet_node_flags(p: argparse.ArgumentParser, need_bundle: bool = True) -> None:
    """The flags of every fleet step (the batch script hands the same list to `fleet node` and `fleet report`);
    the profiles are the bundles' own, so there is no --envs-dir."""
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--bundle", action="append", required=need_bundle,
                   help="a bundle (folder or .tar on the shared filesystem); repeat it for one bundle per profile")
    p.add_argument("--report-dir", type=Path, required=True, help="shared folder for NODE.json and fleet.json")
    p.add_argument("--prefix", default=None,
                   help="environment path on each node; %%n is the node name (no %%n: one shared environment); "
                        "default: the node's data dir's envs/lora")
    p.add_argument("--home", default=None, help="each node's lorastrap data dir (%%n allowed; default DATA_DIR/nodes/%%n)")
    p.add_argument("--profile", default=None,
                   help="one profile for every node (nodes that cannot run it refuse); default: each node's plan")
    p.add_argument("--machines", type=Path, default=None,
                   help="folder of recorded machine descriptions, NODE.json (`detect --json`), used instead of "
                        "detecting the nodes that have one")
    p.add_argument("--pkgs-dir", type=Path, default=None,
                   help="the package cache the nodes share (default: LORASTRAP_PKGS_DIR, else DATA_DIR/pkgs)")
    p.add_argument("--install-arg", action="append", default=[], metavar="ARG",
                   help="one more flag for `lorastrap install` on the nodes (e.g. --install-arg=--engine=rattler)")


def _fleet_parsers(sub) -> None:
    fleet = sub.add_parser("fleet", help="provision, verify and report many nodes through Slurm")
    fsub = fleet.add_subparsers(dest="fleet_command", metavar="STEP", required=True)
    p = fsub.add_parser("slurm", help="from a login node: one lorastrap task on each node, then the fleet report")
    _fleet_node_flags(p)
    p.add_argument("--partition", "-p", default=None, help="the partition (default: Slurm's default partition)")
    p.add_argument("--nodelist", "-w", default=None, help="these nodes only (Slurm's syntax: gpu[01-16])")
    p.add_argument("--time", default=None, help="the job's time limit (sbatch --time)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="one more sbatch flag, e.g. --sbatch-arg=--gres=gpu:1 (repeatable)")
    p.add_argument("--lorastrap", default=None,
                   help="the lorastrap command on the nodes (default: this one, `PYTHON -m lorastrap`)")
    p = fsub.add_parser("node", help="inside the job, on each node: plan, install from a bundle, verify, report")
    _fleet_node_flags(p)
    p = fsub.add_parser("report", help="join the node reports into fleet.json and print the table")
    _fleet_node_flags(p, need_bundle=False)
    p.add_argument("--hosts", default=None, help="the nodes, comma-separated (default: those the job ran on)")


def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in errors.EXIT_CODES.items())
    top = _Parser(prog="lorastrap",
                                  description="lorastrap: detect the machine, choose and install a locked "
                                              "LoRA + 8-bit environment, verify it.",
                                  epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"lorastrap {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    pp = _parents()
    common, where, sources, transaction, machine = (pp[k] for k in ("common", "where", "sources", "transaction",
                                                                    "machine"))

    p = sub.add_parser("detect", parents=[common], help="what this machine has (GPUs, driver, CUDA, platform)")
    p.add_argument("--prefix", type=Path, default=None, help="where the environment will go (for free disk)")

    p = sub.add_parser("plan", parents=[common, machine], help="which environment profile fits this machine, and why")
    p.add_argument("--profile", default=None, help="force a profile; the plan says which requirements it breaks")
    p.add_argument("--why-not", default=None, metavar="NAME", help="list each rule of profile NAME and whether it is met")

    p = sub.add_parser("lock", parents=[common, sources], help="solve a profile's spec and write its conda-lock file")
    p.add_argument("--profile", default=None, help="profile to lock (default: the one plan chooses)")
    p.add_argument("--platform", action="append", default=None,
                   help="conda platform to lock for (repeatable; default: all of the profile's platforms)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write (default: envs/PROFILE.conda-lock.yml)")

    p = sub.add_parser("diff-locks", parents=[common],
                       help="what changed between two lock files: added, removed, changed versions")
    p.add_argument("old", type=Path, help="the lock before (a missing file counts as empty)")
    p.add_argument("new", type=Path, help="the lock after")

    p = sub.add_parser("install", parents=[common, where, sources, transaction, machine],
                       help="install the chosen profile's locked environment (atomically) and verify it")
    p.add_argument("--profile", default=None, help="force a profile (default: the one plan chooses)")
    p.add_argument("--frozen", action="store_true", help="install only from a committed lock; never re-lock")
    p.add_argument("--keep-backup", action="store_true", help="keep the previous environment as PREFIX.lorastrap-backup")
    p.add_argument("--min-free-mib", type=_count(0), default=512, help="disk to keep free beyond what the install needs")
    p.add_argument("--yes", "-y", action="store_true", help="never ask (lorastrap does not ask anyway)")
    p.add_argument("--force", action="store_true",
                   help="replace a conda environment lorastrap did not make (it is kept whole as the backup)")
    p.add_argument("--report", type=_path, default=None, help="also write the JSON result to this file")
    p.add_argument("--bundle", type=_path, default=None, help="install from an offline bundle (folder or .tar)")

    p = sub.add_parser("bundle", parents=[common, sources],
                       help="an offline bundle: lock, archives, runtime wheels, source, manifest")
    p.add_argument("--profile", default=None, help="profile (default: the one plan chooses)")
    p.add_argument("--platform", default=None, help="target conda platform (default: this machine's)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder, or a file ending in .tar")
    p.add_argument("--python-version", default=None, help="the nodes' Python for the runtime wheels (default: this one)")

    p = sub.add_parser("verify", parents=[common, where],
                       help="prove an environment loads a model in 8 bits and LoRA-trains it")
    p.add_argument("--steps", type=_count(1), default=10, help="LoRA optimizer steps")
    p.add_argument("--report", type=_path, default=None, help="also write the JSON report to this file")

    p = sub.add_parser("doctor", parents=[common, pp["anywhere"], machine],
                       help="diagnose an environment (conda, venv, or any Python): files, lock, pip, the machine, "
                            "imports")
    p.add_argument("--no-imports", action="store_true", help="skip the import and version-gate pre-checks")

    p = sub.add_parser("explain", parents=[common, pp["anywhere"], machine],
                       help="explain an error message or traceback: which known failure, which cause here, the fix")
    p.add_argument("source", nargs="?", default=None, metavar="FILE | - | TEXT",
                   help="the error: a file (a training log), - for stdin, or the message itself")
    p.add_argument("--facts", type=Path, default=None,
                   help="judge by this environment description (the `environment` of `explain --json` run elsewhere)")

    p = sub.add_parser("repair", parents=[common, where, machine, sources, transaction],
                       help="rebuild a broken environment through the install transaction (keeps a backup)")
    p.add_argument("--replan", action="store_true", help="rebuild with the profile plan chooses now")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (also when stdin is not a terminal)")
    p.add_argument("--drop-backup", action="store_true", help="remove the old environment once the new one verified")

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

    sub.add_parser("list", parents=[common],
                   help="the environments lorastrap manages here: profile, lock, size, health, generations")

    p = sub.add_parser("update", parents=[common, where, sources, transaction],
                       help="lock the profile again, show what changes, install it (the old one kept for rollback)")
    p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    p.add_argument("--profile", default=None, help="move to another profile (default: the environment's own)")
    p.add_argument("--keep-generations", type=_count(0), default=1, metavar="N",
                   help="previous environments to keep for rollback (default 1; 0 keeps none)")
    p.add_argument("--min-free-mib", type=_count(0), default=512, help="disk to keep free beyond what the install needs")

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
    _fleet_parsers(sub)
    return top


def say(msg: str) -> None:
    """Narration on stderr (LORASTRAP_QUIET=1 silences it; errors and results are still printed)."""
    if not os.environ.get("LORASTRAP_QUIET"):
        print(f"lorastrap: {msg}", file=sys.stderr, flush=True)


def _envs_dir(args) -> Path:
    from lorastrap.core import paths
    return (args.envs_dir or paths.ENVS).absolute()


def _prefix(args) -> Path:
    from lorastrap.core import paths
    name = "lora" if args.name is None else args.name
    if not args.prefix and (name in ("", ".", "..") or "/" in name or "\0" in name):
        raise errors.UsageError(f"--name {name!r} is not an environment name",
                                why=f"a name is one folder under {paths.envs_dir()}; it cannot be empty or hold / or ..",
                                fix="Give a plain name (for example lora), or --prefix PATH for another place.")
    return paths.check_prefix_path((args.prefix or paths.envs_dir() / name).absolute())


def _write_report(path: Path | None, doc: dict) -> None:
    from lorastrap.core import fsutil
    if path is None:
        return
    try:
        fsutil.write_atomic(path, json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise errors.NotWritableError(f"--report {path} could not be written", why=exc.strerror or str(exc),
                                      fix="The work itself is done; rerun with a writable --report path (a no-op "
                                          "for install).")


def _report_target(path: Path | None) -> None:
    """--report: checked before any work, so a bad path cannot fail after the environment changed."""
    if path is None:
        return
    if path.is_dir() or not path.parent.is_dir():
        raise errors.UsageError(f"--report {path}: " + ("a folder" if path.is_dir() else f"{path.parent} does not exist"),
                                why="the report is a file written into an existing folder",
                                fix="Name a file in an existing folder.")


def _sources(args) -> dict:
    """--channel / --mirror / --pip-index-url as the lock and install functions take them: the channels to lock
    from (a mirror stands in for the spec's channel) and where to fetch the locked archives."""
    from lorastrap.locking import lock
    bare, by_channel = _mirrors(args.mirror or [])
    for flag, values, index in (("--channel", args.channel or [], False), ("--mirror", [bare], False),
                                ("--mirror", list(by_channel.values()), False),
                                ("--pip-index-url", [args.pip_index_url], True)):
        for v in values:
            if v is not None:
                lock.check_source(v, flag, index=index)
    return {"channels": args.channel or ([bare] if bare else None),
            "mirror": by_channel or bare or (args.channel[0] if args.channel else None),
            "pip_index_url": args.pip_index_url or lock.DEFAULT_PIP_INDEX}


def _mirrors(values: list[str]) -> tuple[str | None, dict[str, str]]:
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


def _machine(args):
    from lorastrap.machine.detect import Machine, detect
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


MACHINE_MAX_BYTES = 1 << 20  # a `detect --json` is a few KiB


def _print(args, doc: dict, text: str) -> None:
    print(json.dumps(doc, indent=2) if args.json else text)


# --------------------------------------------------------------------------------------------------------------
# Commands

def cmd_detect(args) -> int:
    from lorastrap.machine.detect import detect, format_table
    machine = detect(disk_path=args.prefix)
    print(machine.model_dump_json(indent=2) if args.json else format_table(machine))
    return errors.OK


def cmd_plan(args) -> int:
    from lorastrap.matrix import plan as planner, profiles
    matrix = profiles.load(args.envs_dir)
    if args.why_not:
        profiles.get(matrix, args.why_not)
    machine = _machine(args)
    result = planner.plan(machine, matrix, profile=args.profile)
    _print(args, {"machine": machine.model_dump(mode="json"), "plan": result.model_dump(mode="json")},
           planner.format_plan(result, why_not=args.why_not))
    return errors.OK if result.profile else errors.NO_PROFILE


def cmd_lock(args) -> int:
    from lorastrap.locking import lock
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.machine.detect import detect
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


LOCK_LIMIT = 256 << 20  # a lock of a whole distribution is a few MiB


def cmd_diff_locks(args) -> int:
    from lorastrap.core import fsutil
    from lorastrap.locking import lock
    for path in (args.old, args.new):  # a FIFO or /dev/zero would block or never end: refused before reading
        if path.exists():
            fsutil.read_bounded(path, limit=LOCK_LIMIT, what="lock file", fix="Pass two conda-lock files.")
    old = lock.read_lock(args.old) if args.old.exists() else None
    diff = lock.diff_locks(old, lock.read_lock(args.new))
    _print(args, diff, lock.format_diff(diff))
    return errors.OK


def cmd_install(args) -> int:
    from lorastrap.care import activate
    from lorastrap.fleet import bundle
    from lorastrap.install import transaction as inst
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.install.generations import register
    from lorastrap.core.errors import NoProfileError
    envs = _envs_dir(args)
    _report_target(args.report)
    prefix = inst.check_prefix(_prefix(args), say)
    src = _sources(args)
    opened = bundle.open_bundle(args.bundle) if args.bundle else None
    if opened and not args.envs_dir:
        envs = opened / "envs"  # the profiles the bundle was made from
    matrix = profiles.load(envs)
    machine = _machine(args)
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
    say(f"profile {name} for {machine.platform}" + (" (forced)" if result_plan.forced else "") + f" → {prefix}")
    result = inst.install(
        prefix=prefix, envs_dir=envs, name=name, profile=profiles.get(matrix, name), matrix=matrix,
        platform=machine.platform, lock_file=lock_file, engine=args.engine, frozen=args.frozen, **src,
        keep_backup=args.keep_backup, wait=not args.no_wait, run_verify=not args.no_verify,
        link_mode=args.link_mode, replace_foreign=args.force, allow_link_scripts=args.allow_link_scripts,
        min_free_mib=args.min_free_mib, driver_cuda=machine.cuda, narrate=say,
        plan_info=result_plan.model_dump(mode="json", include={"profile", "forced", "reasons", "warnings"}))
    register(Path(result.prefix))
    doc = inst.node_report(result, machine).model_dump(mode="json")
    _write_report(args.report, doc)
    state = "installed and verified" if result.changed and result.verify else (
        "installed" if result.changed else "already up to date")
    _print(args, doc, f"{state}: {result.prefix} (profile {result.profile}, {result.packages} conda + "
                      f"{result.pip_packages} pip packages, engine {result.engine}, "
                      f"{result.timings.get('total', 0):.1f} s)\n"
                      + activate.usage_hint(Path(result.prefix)))
    return errors.OK


def _bundle_output(out: Path) -> None:
    """Refuse, before any copying, an -o that cannot become a bundle: a device (/dev/null), a file that is not a
    .tar, a path under a file."""
    import stat as _stat
    fix = "Pass -o a new or existing folder, or a file name ending in .tar."
    try:
        st = out.stat() if out.exists() else None
    except OSError as exc:
        raise errors.UsageError(f"-o {out} cannot be used", why=exc.strerror or str(exc), fix=fix)
    if st is not None and not _stat.S_ISDIR(st.st_mode) and not (_stat.S_ISREG(st.st_mode) and out.suffix == ".tar"):
        kind = "a device or FIFO" if not _stat.S_ISREG(st.st_mode) else "a file that is not a .tar"
        raise errors.UsageError(f"-o {out} is {kind}", why="a bundle is a folder or a .tar file; lorastrap never "
                                "writes a bundle over anything else", fix=fix)
    above = out.absolute().parent
    while not above.exists() and above.parent != above:
        above = above.parent
    if not above.is_dir():
        raise errors.UsageError(f"-o {out} lies under {above}, a file", why="its folder cannot be made", fix=fix)


def cmd_bundle(args) -> int:
    from lorastrap.fleet import bundle
    from lorastrap.locking import lock
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.machine.detect import detect
    _bundle_output(args.output)
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
    manifest = bundle.make(envs_dir=envs, name=name, lock_file=lk, platform=platform, out=out, mirror=src["mirror"],
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
    from lorastrap.matrix import profiles
    from lorastrap.install import verify
    from lorastrap.machine.detect import detect
    prefix = _prefix(args)
    _report_target(args.report)
    machine = detect(disk_path=prefix)
    say(f"verifying {prefix} (8-bit load + LoRA training on a tiny local model)")
    report = verify.report(prefix, matrix=profiles.load(_envs_dir(args)), driver_cuda=machine.cuda, steps=args.steps)
    _write_report(args.report, report)
    _print(args, report, verify.summary(report))
    return verify.exit_code(report)


def _anywhere(args) -> tuple[Path | None, Path | None]:
    """--prefix / --name / --python: (prefix, python); both None when none was given."""
    if args.python:
        return None, args.python
    return (_prefix(args) if args.prefix or args.name else None), None


def cmd_doctor(args) -> int:
    from lorastrap.care import doctor
    prefix, python = _anywhere(args)
    diag = doctor.diagnose(None if python else prefix or _prefix(args), python=python, envs_dir=_envs_dir(args),
                           machine=_machine(args), imports=not args.no_imports)
    _print(args, diag.to_dict(), doctor.format_diagnosis(diag))
    return diag.exit_code


def _confirm(command: str = "repair") -> bool:
    """Ask on the terminal; without one (scripts, cron, cluster jobs) a destructive command needs --yes."""
    if not sys.stdin.isatty():
        raise errors.UsageError(f"{command} needs --yes when it cannot ask",
                                why="stdin is not a terminal, and it changes or removes an environment",
                                fix=f"Run `lorastrap {command} ... --yes` once you are sure.")
    return input("lorastrap: go ahead? [y/N] ").strip().lower() in ("y", "yes")


def cmd_explain(args) -> int:
    from lorastrap.care import explain
    text = explain.read_text(args.source, sys.stdin)
    prefix, python = _anywhere(args)
    diag = None
    if prefix or python:
        if args.facts:
            raise errors.UsageError("--facts and an environment (--prefix, --name, --python) exclude each other",
                                    fix="Pass one: the environment here, or a description recorded elsewhere.")
        say("checking the environment (imports, version gates, pip check)")
        result, diag = explain.explain_in(text, prefix=prefix, python=python, envs_dir=_envs_dir(args),
                                          machine=_machine(args))
    else:
        facts = explain.read_facts(args.facts) if args.facts else None
        result = explain.explain(text, table=explain.load(_envs_dir(args)), facts=facts)
        result["environment"] = facts.model_dump() if facts else None
    _print(args, result, explain.format_explanation(result, diag))
    return errors.OK if result["known"] else errors.EXPLAIN_UNKNOWN


def cmd_repair(args) -> int:
    from lorastrap.care import doctor

    diag, result = doctor.repair(
        _prefix(args), envs_dir=_envs_dir(args), machine=_machine(args), replan=args.replan, yes=args.yes,
        keep_backup=not args.drop_backup, confirm=_confirm, wait=not args.no_wait, narrate=say, engine=args.engine,
        run_verify=not args.no_verify, link_mode=args.link_mode, allow_link_scripts=args.allow_link_scripts,
        **_sources(args))
    _print(args, {"before": diag.to_dict(), "result": result.to_dict()},
           f"repaired: {result.prefix} (profile {result.profile}, {result.packages} conda + {result.pip_packages} "
           f"pip packages); previous environment kept at {result.backup or 'nowhere (--drop-backup)'}")
    return errors.OK


def _fleet_options(args):
    from lorastrap.fleet import slurm as fleet
    return fleet.NodeOptions(bundles=fleet.bundle_paths(args.bundle), report_dir=args.report_dir.absolute(),
                             prefix=args.prefix, home=args.home, profile=args.profile,
                             machines=args.machines.absolute() if args.machines else None,
                             pkgs_dir=args.pkgs_dir.absolute() if args.pkgs_dir else None, extra=args.install_arg)


def cmd_fleet(args) -> int:
    from lorastrap.fleet import slurm as fleet
    opts = _fleet_options(args)
    if args.fleet_command == "node":
        doc, error = fleet.run_node(opts, narrate=say)
        if error is not None:
            print(error.render(), file=sys.stderr)
        print(json.dumps(doc, indent=2) if args.json else
              f"{doc['node']}: " + (f"{doc['verify_verdict']} (profile {doc['profile']}, {doc['prefix']})"
                                    if doc["ok"] else "failed"))
        return error.exit_code if error is not None else errors.OK
    if args.fleet_command == "slurm":
        result = fleet.slurm(opts, partition=args.partition, nodelist=args.nodelist, time_limit=args.time,
                             sbatch_args=args.sbatch_arg, lorastrap_cmd=args.lorastrap, narrate=say)
    else:
        result = fleet.report(opts.report_dir, [h for h in (args.hosts or "").split(",") if h])
    say(f"wrote {opts.report_dir / fleet.FLEET_FILE}")
    print(json.dumps(result, indent=2) if args.json else fleet.format_fleet(result))
    return fleet.exit_code(result)


def cmd_run(args) -> int:
    from lorastrap.care import activate
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    activate.run(_prefix(args), argv)  # becomes the command: returns only by raising
    return errors.INTERNAL


def cmd_shell_hook(args) -> int:
    from lorastrap.care import activate
    prefix = activate.require_env(_prefix(args))
    shell = args.shell or activate.default_shell()
    text = activate.script(prefix, shell)
    _print(args, {"prefix": str(prefix), "shell": shell, "script": text}, text.rstrip("\n"))
    return errors.OK


def cmd_shell(args) -> int:
    from lorastrap.care import activate
    activate.shell(_prefix(args), args.shell)
    return errors.INTERNAL


def cmd_list(args) -> int:
    from lorastrap.care import envs
    from lorastrap.core import paths
    rows = envs.list_all()
    _print(args, {"data_dir": str(paths.data_dir()), "environments": rows}, envs.format_list(rows))
    return errors.OK


def cmd_update(args) -> int:
    from lorastrap.care import update
    from lorastrap.install import generations
    from lorastrap.matrix import profiles
    from lorastrap.machine.detect import detect
    prefix = _prefix(args)
    machine = detect(disk_path=prefix)
    src = _sources(args)
    result = update.update(prefix=prefix, envs_dir=_envs_dir(args), matrix=profiles.load(_envs_dir(args)),
                           profile_name=args.profile, channels=src["channels"],
                           mirror=src["mirror"], pip_index_url=src["pip_index_url"], dry_run=args.dry_run,
                           keep_generations=args.keep_generations, engine=args.engine, run_verify=not args.no_verify,
                           wait=not args.no_wait, min_free_mib=args.min_free_mib, driver_cuda=machine.cuda,
                           link_mode=args.link_mode, allow_link_scripts=args.allow_link_scripts, narrate=say)
    if result.changed:
        generations.register(prefix)
    kept = sum(g["bytes"] for g in result.generations)
    head = (f"{'would change' if args.dry_run else 'changes'} in {prefix} (profile {result.profile}, "
            f"{result.platform}): {len(result.changes) or 'none'}")
    tail = ("\nalready up to date" if not result.changes else "\n(dry run: nothing changed)" if args.dry_run else
            f"\nupdated; previous generations kept: {len(result.generations)} ({kept / 2**20:.1f} MiB) — "
            f"`lorastrap rollback` returns to the previous one")
    _print(args, result.to_dict(), head + "\n" + update.format_changes(result.changes) + tail)
    return errors.OK


def cmd_rollback(args) -> int:
    from lorastrap.care import update
    prefix = _prefix(args)
    result = update.rollback(prefix, wait=not args.no_wait, narrate=say)
    _print(args, result.to_dict(),
           f"rolled back {prefix}: now profile {result.now.get('profile', '-')} installed "
           f"{result.now.get('installed_at', '-')}; the replaced one is the previous generation "
           f"(`lorastrap rollback` again returns to it)\n" + update.format_changes(result.changes)
           + f"\nhealth: {result.health}")
    return errors.OK


def cmd_uninstall(args) -> int:
    from lorastrap.care import envs
    prefix = _prefix(args)

    def ask(what: str) -> None:
        print(f"lorastrap: {what}", file=sys.stderr)
        if not _confirm("uninstall"):
            raise LorastrapError("nothing removed", exit_code=errors.INTERRUPTED)

    done = envs.uninstall(prefix, wait=not args.no_wait, narrate=say, confirm=None if args.yes else ask)
    if not done["removed"] and done["dropped_from_registry"] and not done["removed_generations"]:
        _print(args, done, f"{prefix} is not lorastrap's any more: dropped from the registry, nothing deleted")
        return errors.OK
    _print(args, done, f"removed {prefix} and {done['removed_generations']} previous generation(s), "
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
        if not _confirm():
            raise LorastrapError("nothing removed", exit_code=errors.INTERRUPTED)
    envs.self_uninstall(narrate=say)
    _print(args, held, "lorastrap is uninstalled")
    return errors.OK


COMMANDS = {"run": cmd_run, "shell-hook": cmd_shell_hook, "shell": cmd_shell, "list": cmd_list,
            "update": cmd_update, "rollback": cmd_rollback, "uninstall": cmd_uninstall, "self": cmd_self,
            "fleet": cmd_fleet, "detect": cmd_detect, "plan": cmd_plan, "lock": cmd_lock, "diff-locks": cmd_diff_locks,
            "install": cmd_install, "verify": cmd_verify,
            "bundle": cmd_bundle, "doctor": cmd_doctor, "explain": cmd_explain, "repair": cmd_repair}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
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
