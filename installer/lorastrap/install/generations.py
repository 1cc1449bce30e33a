"""The environments lorastrap made on this machine, as the install transaction and rollback keep them: the
registry, generations and the rollback swap's journal.

  DATA/environments.json         every prefix lorastrap installed (the data dir's envs/ are found without it)
  PREFIX.lorastrap-backup        generation 1: the environment an update (or rollback) replaced
  PREFIX.lorastrap-gen-N         older generations (N = 2 … --keep-generations)
  PREFIX.lorastrap-swap.json     a rollback's journal (PREFIX.lorastrap-swap: the current one on its way out)

A generation is the complete environment as it was, still linked for PREFIX (conda environments are not
relocatable, and a generation is never moved anywhere but back to PREFIX).  `rollback` (care/update.py) swaps PREFIX
with generation 1 by three renames under the prefix lock, after writing its journal: a run killed at any point is
finished by the next run (``recover``), which then stops — the rollback it was asked for is done.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lorastrap.core import fsutil, locks, paths
from lorastrap.install import prefix as pfx, txn
# --------------------------------------------------------------------------------------------------------------
# The registry

def registry_path() -> Path:
    return paths.data_dir() / "environments.json"


def registered() -> list[Path]:
    try:
        return [Path(p) for p in json.loads(registry_path().read_text())["environments"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _edit_registry(change) -> None:
    path = registry_path()
    with locks.held(path.with_suffix(".lock"), what="the environment registry"):
        now = [str(p) for p in change(registered())]
        fsutil.write_atomic(path, json.dumps({"environments": sorted(set(now))}, indent=2) + "\n")


def register(prefix: Path) -> None:
    if prefix not in registered():
        _edit_registry(lambda envs: envs + [prefix])


def unregister(prefix: Path) -> None:
    if prefix in registered():
        _edit_registry(lambda envs: [p for p in envs if p != prefix])


def managed() -> list[Path]:
    """The data dir's environments and every registered prefix."""
    found = set(registered())
    if paths.envs_dir().is_dir():
        found |= {p.absolute() for p in paths.envs_dir().iterdir()
                  if ".lorastrap-" not in p.name and pfx.is_conda_env(p)}
    return sorted(found)


# --------------------------------------------------------------------------------------------------------------
# Generations

def generation_path(prefix: Path, n: int) -> Path:
    return txn.backup_path(prefix) if n == 1 else prefix.with_name(f"{prefix.name}.lorastrap-gen-{n}")


def generations(prefix: Path) -> list[Path]:
    """The kept previous environments, newest first."""
    out = []
    if txn.backup_path(prefix).is_dir():
        out.append(txn.backup_path(prefix))
    numbered = []
    for p in prefix.parent.glob(f"{prefix.name}.lorastrap-gen-*"):
        tail = p.name.rsplit("-", 1)[-1]
        if tail.isdigit() and p.is_dir():
            numbered.append((int(tail), p))
    return out + [p for _, p in sorted(numbered)]


def make_room(prefix: Path, keep: int) -> None:
    """Before a transaction that keeps the replaced environment as generation 1: shift the kept ones one place
    older (single renames, oldest first), dropping those beyond KEEP."""
    gens = generations(prefix)
    for i in range(len(gens), 0, -1):
        target = generation_path(prefix, i + 1)
        if i + 1 > keep:
            fsutil.remove_tree(gens[i - 1])
        elif gens[i - 1] != target:
            os.rename(gens[i - 1], target)
    fsutil.fsync_dir(prefix.parent)


def shift_older(prefix: Path) -> list[Path]:
    """Before a repair: move every kept generation one place older (nothing dropped), so the repair's backup (the
    damaged environment) does not take generation 1's place.  Returns the generations as they were."""
    gens = generations(prefix)
    if gens:
        make_room(prefix, len(gens) + 1)
    return gens


def close_gap(prefix: Path) -> None:
    """After a repair: the kept generations move back one place younger where generation 1 is free (single
    renames, youngest first; an interrupted run leaves a gap, which ``generations`` reads in order anyway)."""
    gens = generations(prefix)
    for i, g in enumerate(gens, start=1):
        target = generation_path(prefix, i)
        if g != target and not target.exists():
            os.rename(g, target)
    fsutil.fsync_dir(prefix.parent)


def prune(prefix: Path, keep: int) -> None:
    for old in generations(prefix)[keep:]:
        fsutil.remove_tree(old)


def tree_bytes(path: Path) -> int:
    """Disk used under PATH (allocated blocks, each hard-linked file counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


# --------------------------------------------------------------------------------------------------------------
# Rollback: swap PREFIX and generation 1, journaled

def swap_journal(prefix: Path) -> Path:
    return prefix.with_name(f"{prefix.name}.lorastrap-swap.json")


def outgoing(prefix: Path) -> Path:
    """Where a rollback parks the current environment between its renames."""
    return prefix.with_name(f"{prefix.name}.lorastrap-swap")


def pause(stage: str) -> None:
    """Crash-test hook: LORASTRAP_PAUSE_AT=<stage> stops the process here (SIGSTOP) for a test to kill it."""
    if os.environ.get("LORASTRAP_PAUSE_AT") == stage:
        os.kill(os.getpid(), signal.SIGSTOP)


def recover(prefix: Path, narrate=lambda m: None) -> str | None:
    """Finish a rollback a crash interrupted (prefix lock held): the journal names the generation being made
    current; once the current environment was parked (outgoing), the renames are completed.  Returns what was
    done, or None."""
    journal = swap_journal(prefix)
    if not journal.exists():
        return None
    out = outgoing(prefix)
    what = "an interrupted rollback had not started; nothing was moved"
    if out.exists():
        try:
            target = Path(json.loads(journal.read_text())["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            target = generation_path(prefix, 1)  # written atomically: unreadable only if it was never complete
        narrate(f"an earlier rollback of {prefix} was interrupted: finishing it")
        if not prefix.exists():
            os.rename(target, prefix)
        os.rename(out, target)
        fsutil.fsync_dir(prefix.parent)
        what = "finished an interrupted rollback"
    journal.unlink()
    fsutil.fsync_dir(prefix.parent)
    return what


def recover_all(prefix: Path, narrate) -> str | None:
    """Both journals: a rollback's (swap), then an install transaction's."""
    swapped = recover(prefix, narrate)
    return txn.recover(prefix, narrate) or swapped
