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
    p.add_argument("old", type=Path, help="the lock before (a missing or empty file counts as empty: "
                                          "`<(git show HEAD:envs/P.conda-lock.yml)` of a lock not yet committed)")
    p.add_argument("new", type=Path, help="the lock after")

    return {"lock": cmd_lock, "diff-locks": cmd_diff_locks}


def cmd_lock(args) -> int:
    from lorastrap.locking import lock
    from lorastrap.matrix import plan as planner, profiles
    from lorastrap.machine.detect import detect
    envs = base.envs_dir(args)
    matrix = profiles.load(envs)
    name = args.profile or planner.require_profile(planner.plan(detect(), matrix))
    src = base.sources(args)
    written = lock.lock(envs_dir=envs, name=name, profile=profiles.get(matrix, name), platforms=args.platform,
                        channels=src["channels"], out=args.output, pip_index_url=src["pip_index_url"], narrate=say)
    out = written.path
    result = {"profile": name, "lock": str(out), "platforms": sorted(written.packages), "packages": written.packages}
    emit(args, result, f"wrote {out} (" + ", ".join(f"{p}: {n} packages" for p, n in result["packages"].items()) + ")")
    return errors.OK


LOCK_LIMIT = 256 << 20  # a lock of a whole distribution is a few MiB
LOCK_FIX = "Pass two conda-lock files (OLD may also be empty, missing or a pipe: `<(git show REV:FILE)`)."


def _old_lock(path: Path):
    """diff-locks' OLD: None when missing or empty; a pipe (`<(git show …)`) is read once, boundedly; a device or
    folder is refused (read_bounded says why)."""
    import stat

    from lorastrap.core import fsutil
    from lorastrap.locking import lockfile
    if not path.exists() or path.resolve() == Path("/dev/null"):  # missing, or the empty file of shells
        return None
    if not stat.S_ISFIFO(path.stat().st_mode):
        text = fsutil.read_bounded(path, limit=LOCK_LIMIT, what="lock file", fix=LOCK_FIX)
        return lockfile.read_lock(path) if text.strip() else None
    text = fsutil.read_pipe_bounded(path, limit=LOCK_LIMIT, what="lock file", fix=LOCK_FIX)
    if not text.strip():
        return None
    import tempfile
    with tempfile.TemporaryDirectory(prefix="lorastrap-diff-") as d:
        copy = Path(d) / "old.conda-lock.yml"
        copy.write_text(text)
        try:
            return lockfile.read_lock(copy)
        except errors.LorastrapError as exc:
            exc.what = exc.what.replace(str(copy), str(path))
            raise


def cmd_diff_locks(args) -> int:
    from lorastrap.core import fsutil
    from lorastrap.locking import diff as lockdiff, lockfile
    # NEW first: a regular file (a FIFO or /dev/zero would block or never end: refused before reading)
    fsutil.read_bounded(args.new, limit=LOCK_LIMIT, what="lock file", fix=LOCK_FIX)
    old = _old_lock(args.old)
    diff = lockdiff.by_platform(old, lockfile.read_lock(args.new))
    emit(args, diff, lockdiff.format_by_platform(diff))
    return errors.OK
