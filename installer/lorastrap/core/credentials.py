"""A private server's credentials, for every HTTP request lorastrap makes (archives, wheels, index pages): HTTP Basic
from the URL's own user:password (to that URL's host only) or from $NETRC / ~/.netrc per host (what curl, pip and
conda read); and a URL as it may be printed (its password as ***)."""

from __future__ import annotations

import os
import threading
import urllib.parse


def shown(url: str) -> str:
    """URL as it may be printed: a password in it replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[-1]}"))


def without_login(url: str) -> str:
    """URL without its user:password (what goes on the wire; the credentials go in a header)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int | None]:
    """Scheme, host (any case) and port (the scheme's own when not written) of a URL: where a login given with
    one URL may go along."""
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(parts.scheme)


def redacted(text: str) -> str:
    """TEXT (an engine's message) with the password of every URL in it as ***."""
    import re
    return re.sub(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):[^/\s@]*@", r"\g<scheme>\g<user>:***@",
                  text)


def netrc_login(host: str) -> tuple[str, str] | None:
    """(login, password) for HOST from $NETRC or ~/.netrc, else None; a file that is missing or cannot be parsed
    gives none.  Read again only when the file changed."""
    import netrc
    where = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        st = os.stat(where)
    except OSError:
        return None
    key = (where, st.st_mtime_ns, st.st_size)
    with _LOCK:
        if _NETRC.get("key") != key:
            try:
                _NETRC.update(key=key, file=netrc.netrc(where))
            except (OSError, netrc.NetrcParseError, UnicodeDecodeError):
                _NETRC.update(key=key, file=None)
        found = _NETRC["file"].authenticators(host) if _NETRC["file"] else None
    return (found[0] or "", found[2] or "") if found else None


_NETRC: dict = {}
_LOCK = threading.Lock()


def authorization(parts: urllib.parse.SplitResult, own: bool) -> str | None:
    """The Authorization header's value for a request to PARTS: the URL's own user and password (only when the
    request goes to the URL's own host: OWN), else the host's entry in .netrc; None when there is neither."""
    import base64
    if own and parts.username is not None:
        login = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    else:
        login = netrc_login(parts.hostname or "")
    if login is None:
        return None
    return "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
