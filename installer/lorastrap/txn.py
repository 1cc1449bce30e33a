"""The install transaction's state beside PREFIX, and recovery after a crash.

    PREFIX.lorastrap.lock       the prefix's file lock (held for the whole transaction)
    PREFIX.lorastrap-txn.json   the journal (records.Journal): written before each step that changes PREFIX
    PREFIX.lorastrap-backup     the previous environment while the new one is built (and after, if kept)

A journal left behind means a run died.  ``recover`` (with the prefix lock held) finishes what it left: a
``committing`` journal is completed (the new environment is final), any other state is rolled back (the backup
renamed back to PREFIX, or a partial PREFIX removed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from lorastrap import fsutil
from lorastrap.records import Journal


def backup_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-backup")


def journal_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-txn.json")


def lock_file_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap.lock")


def write_journal(prefix: Path, journal: Journal) -> None:
    fsutil.write_atomic(journal_path(prefix), journal.model_dump_json())


def read_journal(prefix: Path) -> Journal | None:
    """The journal a run left, or None.  One that cannot be read (a crash while writing it is the only way: it is
    written atomically) is taken as the earliest state: roll back."""
    path = journal_path(prefix)
    if not path.exists():
        return None
    try:
        return Journal.model_validate_json(path.read_text())
    except (OSError, ValueError, ValidationError):
        return Journal(state="aside", had_old=backup_path(prefix).exists())


def clear_journal(prefix: Path) -> None:
    journal_path(prefix).unlink(missing_ok=True)
    fsutil.fsync_dir(prefix.parent)


def clear_trash(prefix: Path) -> None:
    for p in prefix.parent.glob(prefix.name + ".lorastrap-*trash-*"):
        shutil.rmtree(p, ignore_errors=True)


def rollback(prefix: Path, had_old: bool, narrate) -> str:
    """Put back what was at PREFIX before the transaction."""
    backup = backup_path(prefix)
    if had_old and backup.exists():
        narrate(f"restoring the previous environment at {prefix}")
        fsutil.remove_tree(prefix)
        os.rename(backup, prefix)
        fsutil.fsync_dir(prefix.parent)
        return "restored the previous environment"
    if had_old:
        return "the previous environment was still in place"  # died before it was moved aside
    narrate(f"removing the partial environment at {prefix}")
    fsutil.remove_tree(prefix)
    return "removed a partial environment"


def recover(prefix: Path, narrate=lambda m: None) -> str | None:
    """Finish what a crashed run left (call with the prefix lock held).  Returns what was done, or None."""
    clear_trash(prefix)
    journal = read_journal(prefix)
    if journal is None:
        return None
    if journal.state == "committing":
        narrate(f"an earlier run was committing {prefix}: finishing it")
        if not journal.keep_backup:
            fsutil.remove_tree(backup_path(prefix))
        what = "completed the interrupted commit"
    else:
        narrate(f"an earlier run was interrupted on {prefix}: rolling it back")
        what = rollback(prefix, journal.had_old, narrate)
    clear_journal(prefix)
    return what
