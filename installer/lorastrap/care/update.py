"""update and rollback: move an environment to the newest packages its profile admits, or back to the previous
generation.  Both run under the prefix lock, first finish what a killed run left (generations.recover_all), and keep the
environment they replace as generation 1 (envs.py) — so each is undone by `rollback`.

update: lock the profile again (into DATA/locks/update/), compare with the lock the environment was built from
(PREFIX/conda-meta/lorastrap/conda-lock.yml) — added, removed, upgraded, downgraded and rebuilt packages, conda and
pip, with versions and builds — then install the new lock through the install transaction (install.install_locked)
with the replaced environment kept as its backup, which is generation 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, field
from pathlib import Path

from lorastrap.care import envs
from lorastrap.install import generations
from lorastrap.core import fsutil, locks, paths
from lorastrap.install import transaction as install, prefix as pfx, txn
from lorastrap.locking import diff as lockdiff, lock as locking, lockfile
from lorastrap.locking.channels import DEFAULT_PIP_INDEX
from lorastrap.matrix import profiles
from lorastrap.core.errors import LorastrapError, NoEnvError, UsageError
from lorastrap.core.plain import Struct, struct
from lorastrap.matrix.profiles import Matrix


# --------------------------------------------------------------------------------------------------------------
# The change between two locks

def _entries(prefix: Path) -> list:
    record = pfx.read_record(prefix)
    if record is None:
        return []
    try:
        return lockfile.read_lock(pfx.own_lock(prefix)).for_platform(record.platform)
    except LorastrapError:
        return []


def lock_diff(old_prefix: Path, new_prefix: Path) -> list[dict]:
    """The change from one environment's own lock to another's."""
    return lockdiff.changes(_entries(old_prefix), _entries(new_prefix))


# --------------------------------------------------------------------------------------------------------------
# update

@struct
class UpdateResult(Struct):
    prefix: str
    profile: str
    platform: str
    lock: str | None
    dry_run: bool
    changes: list[dict]
    changed: bool = False
    recovered: str | None = None
    install: dict | None = None
    generations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _generations(prefix: Path) -> list[dict]:
    return [{"path": str(g), "bytes": generations.tree_bytes(g)} for g in generations.generations(prefix)]


def update(*, prefix: Path, envs_dir: Path, matrix: Matrix, profile_name: str | None = None,
           channels: list[str] | None = None, mirror: str | dict[str, str] | None = None,
           pip_index_url: str = DEFAULT_PIP_INDEX, dry_run: bool = False, keep_generations: int = 1,
           engine: str | None = None, run_verify: bool = True, wait: bool = True, min_free_mib: int = 512,
           driver_cuda: str | None = None, link_mode: str = "hardlink", allow_link_scripts: bool = False,
           narrate=lambda m: None) -> UpdateResult:
    if keep_generations < 0:
        raise UsageError(f"--keep-generations {keep_generations}: must be 0 or more")
    with locks.held(txn.lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate):
        recovered = generations.recover_all(prefix, narrate)
        record = pfx.read_record(prefix)
        if record is None:
            raise NoEnvError(f"no environment installed by lorastrap at {prefix}",
                             why="update starts from an environment's record and lock (conda-meta/lorastrap/)",
                             fix="Install it first: `lorastrap install`; `lorastrap list` shows the environments.")
        old = lockfile.read_lock(pfx.own_lock(prefix))
        name = profile_name or record.profile
        profile = profiles.get(matrix, name)
        chans = channels or (old.channels if name == record.profile else None)
        work = Path(tempfile.mkdtemp(prefix="lorastrap-update-")) if dry_run else (
            paths.data_dir() / "locks" / "update")
        work.mkdir(parents=True, exist_ok=True)
        out = work / f"{name}.{record.platform}.conda-lock.yml"
        try:
            out.unlink(missing_ok=True)
            narrate(f"locking {name} for {record.platform} again (the newest packages the spec admits)")
            locking.lock(envs_dir=envs_dir, name=name, profile=profile, platforms=[record.platform],
                         channels=chans, out=out, pip_index_url=pip_index_url, narrate=narrate)
            new = lockfile.read_lock(out)
            changes = lockdiff.changes(old.for_platform(record.platform), new.for_platform(record.platform))
        finally:
            if dry_run:
                shutil.rmtree(work, ignore_errors=True)
        result = UpdateResult(prefix=str(prefix), profile=name, platform=record.platform,
                              lock=None if dry_run else str(out), dry_run=dry_run, changes=changes,
                              recovered=recovered)
        if dry_run or not changes:
            result.generations = _generations(prefix)
            return result
        narrate(f"{len(changes)} change(s); installing the new lock (the current environment is kept as the "
                f"previous generation)" if keep_generations else f"{len(changes)} change(s); installing the new lock")
        generations.make_room(prefix, keep_generations)
        done = install.install_locked(
            prefix=prefix, envs_dir=envs_dir, name=name, profile=profile, platform=record.platform, matrix=matrix,
            engine=engine, channels=chans, mirror=mirror, pip_index_url=pip_index_url,
            keep_backup=keep_generations > 0, run_verify=run_verify, min_free_mib=min_free_mib,
            plan_info=record.plan, driver_cuda=driver_cuda, lock_file=out, link_mode=link_mode,
            allow_link_scripts=allow_link_scripts, narrate=narrate)
        generations.prune(prefix, keep_generations)
        result.changed, result.install = done.changed, done.to_dict()
        result.generations = _generations(prefix)
        return result
# --------------------------------------------------------------------------------------------------------------
# rollback

@struct
class RollbackResult(Struct):
    prefix: str
    recovered: str | None
    swapped: bool
    now: dict = field(default_factory=dict)  # the environment now current (its record)
    previous: dict = field(default_factory=dict)  # the one kept as generation 1
    changes: list[dict] = field(default_factory=list)
    health: str = envs.HEALTHY

    def to_dict(self) -> dict:
        return asdict(self)


def rollback(prefix: Path, *, wait: bool = True, narrate=lambda m: None) -> RollbackResult:
    """Make generation 1 current again; the current environment becomes generation 1."""
    with locks.held(txn.lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate):
        swapped = generations.recover(prefix, narrate)
        txn_recovered = txn.recover(prefix, narrate)
        result = RollbackResult(prefix=str(prefix), recovered=swapped or txn_recovered, swapped=False)
        if swapped and swapped.startswith("finished"):
            result.swapped = True  # the interrupted run's rollback is the one asked for again: done
        else:
            gens = generations.generations(prefix)
            if not pfx.is_conda_env(prefix):
                raise NoEnvError(f"no environment at {prefix}", fix="`lorastrap list` shows the environments.")
            if not gens:
                raise NoEnvError(f"{prefix} has no previous generation to roll back to",
                                 why="one is kept when `lorastrap update` (or `rollback`) replaces an environment",
                                 fix="`lorastrap list` shows the generations kept; `lorastrap update` keeps one.")
            install.user_files_follow(prefix, gens[0], narrate)  # the user's work stays current
            journal = generations.swap_journal(prefix)
            fsutil.write_atomic(journal, json.dumps({"prefix": str(prefix), "generation": str(gens[0])}) + "\n")
            generations.pause("rollback-journal")
            os.rename(prefix, generations.outgoing(prefix))
            fsutil.fsync_dir(prefix.parent)
            generations.pause("rollback-aside")
            os.rename(gens[0], prefix)
            fsutil.fsync_dir(prefix.parent)
            generations.pause("rollback-swapped")
            os.rename(generations.outgoing(prefix), gens[0])
            journal.unlink()
            fsutil.fsync_dir(prefix.parent)
            result.swapped = True
        kept = generations.generations(prefix)[0]
        now, before = pfx.read_record(prefix), pfx.read_record(kept)
        result.now = now.model_dump(include={"profile", "platform", "installed_at"}) if now else {}
        result.previous = before.model_dump(include={"profile", "platform", "installed_at"}) if before else {}
        result.changes = lock_diff(kept, prefix)
        result.health = envs.health(prefix)
        return result
