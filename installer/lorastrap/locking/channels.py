"""Where packages come from: a user's --channel / --mirror / --pip-index-url checked, a channel name made a URL,
and a lock's package URLs rewritten onto a mirror of the same layout (CHANNEL/SUBDIR/FILE)."""

from __future__ import annotations

import re
from pathlib import Path

from lorastrap.core.errors import UsageError

DEFAULT_CHANNEL_ALIAS = "https://conda.anaconda.org"
DEFAULT_PIP_INDEX = "https://pypi.org/simple"


CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/label/[A-Za-z0-9_.-]+)?$")


def check_source(value: str, flag: str, *, index: bool = False) -> str:
    """A --channel / --mirror (a conda channel: http(s) or file URL, a folder, or a name) or --pip-index-url
    (index=True: an http(s) or file URL) as given by a user; refused with what / why / fix when it is none."""
    fix = (f"Give {flag} an http(s):// or file:// URL" + ("" if index else ", a folder that exists, or a channel "
           "name such as conda-forge") + ".")
    text = value.strip()
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(\S*)$", text)
    if match:
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme in ("http", "https") and rest and not rest.startswith("/") or scheme == "file" and rest:
            return text
        raise UsageError(f"{flag} {value!r} is not a usable URL",
                         why="only http://, https:// (with a host) and file:// are supported", fix=fix)
    if not index and text and ("/" in text or text.startswith(".")):
        if Path(text).expanduser().is_dir():
            return text
        raise UsageError(f"{flag} {value!r}: no such folder", why="a path must name the channel's folder", fix=fix)
    if not index and CHANNEL_NAME.match(text):
        return text
    raise UsageError(f"{flag} {value!r} is not a channel URL, folder or name" if not index else
                     f"{flag} {value!r} is not a URL", why="it would silently become a channel nobody meant", fix=fix)


def channel_url(channel: str) -> str:
    """'conda-forge' → https://conda.anaconda.org/conda-forge; URLs (http, https, file) and paths pass through."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", channel):
        return channel.rstrip("/")
    if channel.startswith("/") or channel.startswith("."):
        return Path(channel).resolve().as_uri()
    return f"{DEFAULT_CHANNEL_ALIAS}/{channel}"


def logged_in(url: str, given: list[str]) -> str:
    """A lock's package URL (written without user:password: a lock is shared, committed, read by others) with the
    login of the --channel or --mirror URL given now that it lies under, if that one names a login; else as it
    is (the host's .netrc entry, if any, then applies)."""
    from lorastrap.core.credentials import without_login
    bare = without_login(url)
    for source in sorted((channel_url(g) for g in given if "@" in g), key=len, reverse=True):
        base = without_login(source)
        if base != source and bare.startswith(base + "/"):
            return source + bare[len(base):]
    return url


def mirrored(url: str, channels: list[str], mirror: str | dict[str, str] | None) -> str:
    """Rewrite a package URL of one of the lock's channels onto a mirror (same layout: CHANNEL/SUBDIR/FILE).
    MIRROR: one URL (for every channel: a lock of one channel), or {channel: URL} (--mirror CHANNEL=URL, like
    pixi's [mirrors]; a channel given by name or URL), which rewrites only the channels it names."""
    if not mirror:
        return url
    for ch in sorted(channels, key=len, reverse=True):
        base = channel_url(ch)
        if url.startswith(base + "/"):
            if isinstance(mirror, str):
                return channel_url(mirror) + url[len(base):]
            target = next((m for k, m in mirror.items() if channel_url(k) == base), None)
            return channel_url(target) + url[len(base):] if target else url
    return url
