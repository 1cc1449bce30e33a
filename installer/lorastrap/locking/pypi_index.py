"""The one reader of a Python package index's simple API: PEP 691 JSON when the index offers it, PEP 503 HTML
otherwise (the sha256 in each link's fragment, data-requires-python, data-yanked), over http(s) or from a folder
(file:// URL or path: INDEX/NAME/index.html, else the files in INDEX/NAME/).  Used to lock `pip:` entries
(pipside) and to find a lock's wheel on another index (--pip-index-url, install)."""

from __future__ import annotations

import html.parser
import http.client
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from lorastrap.core import credentials
from lorastrap.core.credentials import shown
from lorastrap.core.errors import NetworkError
from lorastrap.core.plain import Struct, struct

INDEX_TIMEOUT_S = 60
MAX_PAGE_BYTES = 64 * 2**20  # a project page of PyPI's largest projects is a few MiB
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{JSON_TYPE}, text/html;q=0.1"  # PEP 691's negotiation: JSON preferred, HTML accepted


@struct
class IndexFile(Struct):
    filename: str
    url: str
    sha256: str | None
    requires_python: str | None
    yanked: bool

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    @property
    def version(self) -> Version | None:
        try:
            if self.is_wheel:
                return parse_wheel_filename(self.filename)[1]
            stem = re.sub(r"\.(tar\.gz|zip|tar\.bz2)$", "", self.filename)
            return Version(stem.rsplit("-", 1)[1])
        except (InvalidWheelFilename, InvalidVersion, IndexError):
            return None


class _Links(html.parser.HTMLParser):
    def __init__(self, base: str):
        super().__init__()
        self.base, self.files, self._attrs = base, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._attrs = dict(attrs)

    def handle_data(self, data):
        if self._attrs is not None and data.strip():
            href = urllib.parse.urljoin(self.base, self._attrs.get("href", ""))
            url, _, frag = href.partition("#")
            sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
            # PEP 503: the anchor's text is the filename
            self.files.append(IndexFile(filename=data.strip(), url=url, sha256=sha,
                                        requires_python=self._attrs.get("data-requires-python"),
                                        yanked="data-yanked" in self._attrs))
            self._attrs = None


def _from_json(text: str, base: str) -> list[IndexFile]:
    return [IndexFile(filename=f["filename"], url=urllib.parse.urljoin(base, f["url"]),
                      sha256=(f.get("hashes") or {}).get("sha256"), requires_python=f.get("requires-python"),
                      yanked=bool(f.get("yanked"))) for f in json.loads(text).get("files", [])]


def _from_html(text: str, base: str) -> list[IndexFile]:
    parser = _Links(base)
    parser.feed(text)
    return parser.files


def project_url(index_url: str, name: str) -> str:
    return f"{index_url.rstrip('/')}/{canonicalize_name(name)}/"


def files(index_url: str, name: str, *, timeout: float = INDEX_TIMEOUT_S) -> list[IndexFile]:
    """Every file the index lists for a project ([] when the index has no such project)."""
    page = project_url(index_url, name)
    if page.startswith("file://") or page.startswith("/"):
        folder = Path(urllib.request.url2pathname(page[len("file://"):])) if page.startswith("file://") else Path(page)
        if (folder / "index.html").is_file():
            return _from_html((folder / "index.html").read_text(errors="replace"), folder.as_uri() + "/")
        return [IndexFile(filename=p.name, url=p.as_uri(), sha256=None, requires_python=None, yanked=False)
                for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []
    parts = urllib.parse.urlsplit(page)
    req = urllib.request.Request(credentials.without_login(page), headers={"User-Agent": "lorastrap", "Accept": ACCEPT})
    auth = credentials.authorization(parts, own=True)
    if auth:  # an unredirected header: a redirect to another host does not carry it there
        req.add_unredirected_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read(MAX_PAGE_BYTES + 1)
            base, kind = resp.geturl(), resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        if exc.code in (401, 403):
            host = parts.hostname
            raise NetworkError(f"could not read the pip index page {shown(page)}",
                               why=f"HTTP {exc.code}: {host} wants credentials",
                               fix=f"Give them in ~/.netrc (or the file $NETRC names): `machine {host} login USER "
                                   f"password PASSWORD`, or in the URL (https://USER:PASSWORD@{host}/…); lorastrap "
                                   "sends them to that host only.")
        raise NetworkError(f"could not read the pip index page {shown(page)}", why=f"HTTP {exc.code}",
                           fix="Check the index URL (--pip-index-url, a PEP 503 simple index) or the network.")
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise NetworkError(f"could not read the pip index page {shown(page)}", why=str(getattr(exc, "reason", exc)),
                           fix="Check the network or proxy, or pass --pip-index-url for a reachable index.")
    if len(raw) > MAX_PAGE_BYTES:  # bytes: the decoded text of multi-byte characters is shorter than its page
        raise NetworkError(f"the pip index page {shown(page)} is larger than {MAX_PAGE_BYTES // 2**20} MiB",
                           fix="Check that --pip-index-url names a PEP 503/691 simple index.")
    text = raw.decode("utf-8", "replace")
    try:
        return _from_json(text, base) if kind == JSON_TYPE else _from_html(text, base)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NetworkError(f"the pip index page {shown(page)} cannot be read", why=str(exc).splitlines()[0],
                           fix="Check that --pip-index-url names a PEP 503/691 simple index.")


def file_url(index_url: str, name: str, filename: str, *, timeout: float = INDEX_TIMEOUT_S) -> str:
    """The URL of one file of a project on the index (a PyPI mirror holding the lock's exact wheel), to download it
    now: on the index's own host it carries the index URL's user:password, as pip passes them on (the URLs files()
    gives, which a lock records, never do)."""
    index = urllib.parse.urlsplit(index_url)
    for f in files(index_url, name, timeout=timeout):
        if f.filename == filename:
            at = urllib.parse.urlsplit(f.url)
            if index.username is not None and "@" not in at.netloc and credentials.origin(at) == credentials.origin(index):
                return urllib.parse.urlunsplit(at._replace(netloc=f"{index.netloc.rsplit('@', 1)[0]}@{at.netloc}"))
            return f.url
    raise NetworkError(f"{filename} is not on the pip index {shown(index_url)}",
                       why=f"{shown(project_url(index_url, name))} does not list it (the lock names this exact wheel)",
                       fix="Put the lock's wheels on that index (a PyPI mirror), or install from a bundle.")
