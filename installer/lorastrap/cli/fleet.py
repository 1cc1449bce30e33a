"""Fleets: `lorastrap bundle` (an offline bundle) and `lorastrap fleet slurm|node|report`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorastrap.cli import base
from lorastrap.cli.base import emit, say
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("bundle", parents=[common, sources],
                       help="an offline bundle: lock, archives, runtime wheels, source, manifest")
    p.add_argument("--profile", default=None, help="profile (default: the one plan chooses)")
    p.add_argument("--platform", default=None, help="target conda platform (default: this machine's)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder, or a file ending in .tar")
    p.add_argument("--python-version", default=None, help="the nodes' Python for the runtime wheels (default: this one)")
    p.add_argument("--self-contained", action="store_true",
                   help="keep lorastrap's runtime wheels inside the bundle (default: in lorastrap-runtime/ beside "
                        "it, one store that the bundles in that folder share)")

    _fleet_parsers(sub)
    return {"bundle": cmd_bundle, "fleet": cmd_fleet}


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
    p.add_argument("--repair", action="store_true",
                   help="rebuild a node's environment from its own lock when it fails verification, then verify "
                        "again (default: report it failed, with the repair command)")


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


def _fleet_options(args):
    from lorastrap.fleet import slurm as fleet
    return fleet.NodeOptions(bundles=fleet.bundle_paths(args.bundle), report_dir=args.report_dir.absolute(),
                             prefix=args.prefix, home=args.home, profile=args.profile,
                             machines=args.machines.absolute() if args.machines else None,
                             pkgs_dir=args.pkgs_dir.absolute() if args.pkgs_dir else None, extra=args.install_arg,
                             repair=args.repair)


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
    from lorastrap.locking import choose, spec
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.machine.detect import detect
    _bundle_output(args.output)
    envs = base.envs_dir(args)
    matrix = profiles.load(envs)
    machine = detect()
    name = args.profile or planner.require_profile(planner.plan(machine, matrix))
    profile = profiles.get(matrix, name)
    platform = args.platform or machine.platform
    src = base.sources(args)
    lk = choose.choose(envs_dir=envs, name=name, profile=profile, platform=platform, frozen=False,
                       channels=src["channels"], pip_index_url=src["pip_index_url"], narrate=say)
    out = args.output.absolute()
    from lorastrap.install.transaction import login_sources
    manifest = bundle.make(envs_dir=envs, name=name, lock_file=lk, platform=platform, out=out, mirror=src["mirror"],
                           pip_index_url=src["pip_index_url"],
                           logins=login_sources(src["channels"], src["mirror"], envs, profile),
                           virtual_packages=spec.virtual_packages(envs, profile, platform),
                           python_version=args.python_version, self_contained=args.self_contained, narrate=say)
    store = out.parent / bundle.RUNTIME_STORE
    summary = {"profile": manifest.profile, "platform": manifest.platform, "python_version": manifest.python_version,
               "packages": manifest.packages, "bytes": manifest.bytes, "path": str(out),
               "runtime_store": None if manifest.runtime is None else str(store),
               "runtime_bytes": sum(w.size for w in manifest.runtime.wheels.values()) if manifest.runtime else None}
    copy = "" if manifest.runtime is None else (
        f"; its runtime wheels ({summary['runtime_bytes'] / 2**20:.1f} MiB) are in {store}, shared by the bundles "
        f"there: copy that folder beside the bundle too")
    emit(args, summary, f"bundle {out}: profile {name} for {platform}, {manifest.packages} packages, "
                        f"{manifest.bytes / 2**20:.1f} MiB{copy}; install on a node with: "
                        + (f"tar -xf {out} -C {out.parent} && " if out.suffix == ".tar" else "")
                        + f"sh {out.with_suffix('') if out.suffix == '.tar' else out}/source/setup.sh --bundle {out}")
    return errors.OK


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
        code = fleet.exit_code(result)
    else:
        result, code = fleet.report_command(opts.report_dir, [h for h in (args.hosts or "").split(",") if h])
    say(f"wrote {result.get('report_dir') or opts.report_dir}/{fleet.FLEET_FILE}")
    print(json.dumps(result, indent=2) if args.json else fleet.format_fleet(result))
    return code
