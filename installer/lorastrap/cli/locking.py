"""`lorastrap lock` (solve a profile and write its lock) and `lorastrap diff-locks`."""

from __future__ import annotations

from pathlib import Path

from lorastrap.cli import base
from lorastrap.cli.base import emit, say
from lorastrap.core import errors


def add(sub, pp: dict) -> dict:
    """Register this group's commands on ``sub``; returns command name → function."""
    common, where, anywhere, sources, transaction, machine = (
        pp[k] for k in ("common", "where", "anywhere", "sources", "transaction", "machine"))
    p = sub.add_parser("lock", parents=[common, sources], help="solve a profile's spec and write its conda-lock file")
    p.add_argument("--profile", default=None, help="profile to lock (default: the one plan chooses)")
    p.add_argument("--platform", action="append", default=None,
                   help="conda platform to lock for (repeatable; default: all of the profile's platforms)")
    p.add_argument("-o", "--output", type=Path, default=None, help="where to write (default: envs/PROFILE.conda-lock.yml)")

    p = sub.add_parser("diff-locks", parents=[common],
                       help="what changed between two lock files: added, removed, changed versions")
    p.add_argument("old", type=Path, help="the lock before (a missing file counts as empty)")
    p.add_argument("new", type=Path, help="the lock after")

    return {"lock": cmd_lock, "diff-locks": cmd_diff_locks}


def cmd_lock(args) -> int:
    from lorastrap.locking import lock, lockfile
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.machine.detect import detect
    envs = base.envs_dir(args)
    matrix = profiles.load(envs)
    name = args.profile or planner.require_profile(planner.plan(detect(), matrix))
    src = base.sources(args)
    out = lock.lock(envs_dir=envs, name=name, profile=profiles.get(matrix, name), platforms=args.platform,
                    channels=src["channels"], out=args.output, pip_index_url=src["pip_index_url"], narrate=say)
    written = lockfile.read_lock(out)
    result = {"profile": name, "lock": str(out), "platforms": written.platforms,
              "packages": {p: len(written.for_platform(p)) for p in written.platforms}}
    emit(args, result, f"wrote {out} (" + ", ".join(f"{p}: {n} packages" for p, n in result["packages"].items()) + ")")
    return errors.OK


LOCK_LIMIT = 256 << 20  # a lock of a whole distribution is a few MiB


def cmd_diff_locks(args) -> int:
    from lorastrap.core import fsutil
    from lorastrap.locking import diff as lockdiff, lockfile
    for path in (args.old, args.new):  # a FIFO or /dev/zero would block or never end: refused before reading
        if path.exists():
            fsutil.read_bounded(path, limit=LOCK_LIMIT, what="lock file", fix="Pass two conda-lock files.")
    old = lockfile.read_lock(args.old) if args.old.exists() else None
    diff = lockdiff.by_platform(old, lockfile.read_lock(args.new))
    emit(args, diff, lockdiff.format_by_platform(diff))
    return errors.OK
