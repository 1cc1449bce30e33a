"""What a check or a parse found, kept in the data dir's checked/ for the next run that reads the same input: one
JSON document a NAME, ``{"key": KEY, FIELD: value}``, used only while KEY (a digest of the input, and of whatever
else the answer depends on) is the same.  In the data dir, the user's own — never in the package cache, which nodes
and users may share.  Never failing: an entry that cannot be read, or a data dir that cannot be used, only means
the work is done again; written atomically without fsync (a hint)."""

from __future__ import annotations

import json
from pathlib import Path

from lorastrap.core import fsutil, paths
from lorastrap.core.errors import LorastrapError


def _file(name: str) -> Path | None:
    try:
        return paths.data_dir() / "checked" / f"{name}.json"
    except LorastrapError:  # no usable data dir
        return None


def recall(name: str, key: str, field: str):
    """The value kept under NAME for KEY, or None."""
    where = _file(name)
    try:
        doc = json.loads(where.read_bytes()) if where else None
        return doc[field] if isinstance(doc, dict) and doc.get("key") == key else None
    except (OSError, ValueError, KeyError):
        return None


def keep(name: str, key: str, field: str, value, *, exact: bool = True, newest: tuple[str, int] | None = None) -> None:
    """Keep VALUE under NAME for KEY.  exact: only when JSON holds it exactly (a YAML date or a number as a key
    would come back changed; a reader that checks what it recalls passes False).  newest=(GLOB, N): then keep only
    the N newest entries of checked/ that match GLOB."""
    where = _file(name)
    if where is None:
        return
    try:
        text = json.dumps({"key": key, field: value})
        if exact and json.loads(text)[field] != value:
            return
        where.parent.mkdir(parents=True, exist_ok=True)
        fsutil.write_atomic(where, text + "\n", durable=False)
        if newest:
            kept = sorted(where.parent.glob(newest[0]), key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for old in kept[newest[1]:]:
                old.unlink()
    except (OSError, TypeError, ValueError, LorastrapError):
        pass
