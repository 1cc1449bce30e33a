"""The install transaction's state beside PREFIX, and recovery after a crash.

    PREFIX.lorastrap.lock       the prefix's file lock (held for the whole transaction)
    PREFIX.lorastrap-txn.json   the journal (records.Journal): written before each step that changes PREFIX
    PREFIX.lorastrap-backup     the previous environment while the new one is built (and after, if kept)
    PREFIX.lorastrap-children   the children the transaction started: host, boot, token, pids (ended by recovery)

A journal left behind means a run died.  ``recover`` (with the prefix lock held) finishes what it left: a
``committing`` journal is completed (the new environment is final), any other state is rolled back (the backup
renamed back to PREFIX, or a partial PREFIX removed).

Writing the ``committing`` journal is the point of no return: from there on nothing rolls back.  The steps that
must not be cut in half by Ctrl-C, SIGTERM or SIGHUP (moving PREFIX aside, rolling back, committing, recovering)
run inside ``deferred_signals``: those signals are held until the step is done, then honoured.  SIGKILL cannot
be held; the journal covers it.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from lorastrap.core import fsutil, signals, subproc
from lorastrap.core.errors import Interrupted
from lorastrap.core.records import Journal

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def deferred_signals(after: str = "", *, swallow: bool = False):
    """Hold Ctrl-C, SIGTERM and SIGHUP while the block runs; when it ends, a signal that came meanwhile raises
    Interrupted (``after`` says what state it leaves), or with ``swallow`` is dropped (the caller is already
    stopping).  The signals are caught by handlers, which are the process's whatever thread the kernel delivers a
    signal to (a blocked signal mask would hold them for the calling thread only)."""
    caught: list[int] = []

    def hold(signum, frame) -> None:
        caught.append(signum)

    with signals.handled(STOP_SIGNALS, hold):
        yield
    if caught and not swallow:
        name = signal.Signals(min(caught)).name
        raise Interrupted(f"stopped by {name}" + (f" {after}" if after else ""),
                          why="the run was interrupted; the step under way was finished first",
                          fix="Run the same command again; it will converge.")


def backup_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-backup")


def journal_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-txn.json")


def children_path(prefix: Path) -> Path:
    """The process groups of the children a transaction started (subproc.recording_groups)."""
    return prefix.with_name(prefix.name + ".lorastrap-children")


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
    except (OSError, ValueError):  # ValueError: also pydantic's ValidationError (not valid, or not JSON)
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
    with deferred_signals("after finishing what an earlier run left"):
        return _recover(prefix, narrate)


def _recover(prefix: Path, narrate) -> str | None:
    if subproc.kill_recorded_groups(children_path(prefix), narrate=narrate):
        narrate("stopped what was left of the children of an earlier run")
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
