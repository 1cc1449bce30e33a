"""What a package archive says about its own files: ``info/paths.json`` read straight from a checked archive
(`.conda`: a zip holding ``info-*.tar.zst``; `.tar.bz2`: one tar), without an engine.

Used before anything changes — the prefix-length preflight (a binary prefix placeholder can only be overwritten
by a path no longer than itself: conda and rattler pad the new prefix with NULs and refuse a longer one) — and to
validate an extracted copy in the package cache against the hashes its own package lists.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import zstandard

from lorastrap.core.errors import IntegrityError


def paths_json(archive: Path) -> dict:
    """The archive's info/paths.json (``{"paths": [...], "paths_version": 1}``)."""
    try:
        if archive.name.endswith(".conda"):
            with zipfile.ZipFile(archive) as z:
                info = next(n for n in z.namelist() if n.startswith("info-") and n.endswith(".tar.zst"))
                raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(z.read(info))).read()
            with tarfile.open(fileobj=io.BytesIO(raw)) as t:
                return json.load(t.extractfile("info/paths.json"))
        with tarfile.open(archive, "r:bz2") as t:
            return json.load(t.extractfile("info/paths.json"))
    except (OSError, KeyError, StopIteration, ValueError, zipfile.BadZipFile, tarfile.TarError,
            zstandard.ZstdError) as exc:
        raise IntegrityError(f"{archive.name}: its info/paths.json cannot be read", why=str(exc) or type(exc).__name__,
                             fix="Delete the package cache entry (the data dir's pkgs/) and rerun.")


def binary_placeholder_length(archive: Path) -> int | None:
    """The shortest binary prefix placeholder in the archive (None: it has none)."""
    lengths = [len(p["prefix_placeholder"]) for p in paths_json(archive).get("paths", [])
               if p.get("prefix_placeholder") and p.get("file_mode") == "binary"]
    return min(lengths) if lengths else None
