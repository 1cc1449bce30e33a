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
    if re.match(r"^[a-z][a-z0-9+.-]*://", channel, re.I):  # HTTP://… is a URL too, never a channel name
        scheme, rest = channel.split("://", 1)
        return f"{scheme.lower()}://{rest}".rstrip("/")
    if channel.startswith("/") or channel.startswith("."):
        return Path(channel).resolve().as_uri()
    return f"{DEFAULT_CHANNEL_ALIAS}/{channel}"


def logged_in(url: str, given: list[str]) -> str:
    """A lock's package URL (written without user:password: a lock is shared, committed, read by others) with the
    login of the --channel or --mirror URL given now that it lies under, if that one names a login; else as it
    is (the host's .netrc entry, if any, then applies)."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        return url
    for source in sorted((channel_url(g) for g in given if "@" in g), reverse=True,  # the longest path first;
                         key=lambda g: (len(channel_key(g)[3]), urllib.parse.urlsplit(g).password is not None)):
        login = urllib.parse.urlsplit(source).netloc.rpartition("@")[0]
        if login and _rest(url, source) is not None:
            return urllib.parse.urlunsplit(parts._replace(netloc=f"{login}@{parts.netloc}"))
    return url


def channel_key(channel: str) -> tuple[str, str, int | None, str]:
    """Where a channel (or a URL) is, however it is spelled: its origin (credentials.origin: scheme, host in lower
    case, port — the scheme's own when not written), then its path without the trailing /; no login.  The solver
    writes a lock's package URLs in that form (http://HOST:80/ch gives http://host/ch/linux-64/…)."""
    import urllib.parse

    from lorastrap.core.credentials import origin
    parts = urllib.parse.urlsplit(channel_url(channel))
    return (*origin(parts), parts.path.rstrip("/"))


def _rest(url: str, channel: str) -> str | None:
    """What of URL lies under CHANNEL ("/SUBDIR/FILE"), compared as channel_key does; None when it is not."""
    *where, path = channel_key(url)
    *c_where, c_path = channel_key(channel)
    if where != c_where or not path.startswith(c_path + "/"):
        return None
    return path[len(c_path):]


def mirrored(url: str, channels: list[str], mirror: str | dict[str, str] | None) -> str:
    """Rewrite a package URL of one of the lock's channels onto a mirror (same layout: CHANNEL/SUBDIR/FILE).
    MIRROR: one URL (for every channel: a lock of one channel), or {channel: URL} (--mirror CHANNEL=URL, like
    pixi's [mirrors]; a channel given by name or URL), which rewrites only the channels it names."""
    if not mirror:
        return url
    for ch in sorted(channels, key=lambda c: len(channel_key(c)[3]), reverse=True):
        rest = _rest(url, ch)
        if rest is not None:
            if isinstance(mirror, str):
                return channel_url(mirror) + rest
            target = next((m for k, m in mirror.items() if channel_key(k) == channel_key(ch)), None)
            return channel_url(target) + rest if target else url
    return url
