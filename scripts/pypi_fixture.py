"""Real PyPI metadata, recorded once, served offline: the pip side of the profiles' locks, repeatable.

    python scripts/pypi_fixture.py record OUT.json NAME[==VERSION] ...   # read pypi.org's JSON API and .metadata files
    python scripts/pypi_fixture.py serve OUT.json DIR                     # write a PEP 503 index (+ PEP 658 metadata)

For NAME==VERSION only that release's files are recorded (NAME==latest: the newest release with a wheel;
NAME==latest:3.10 the newest one for that Python); for a
bare NAME every release's file names (so the newest-release check sees them) and the metadata of the newest
release that has a wheel.  Links carry the real
sha256; the wheels themselves are not recorded (resolution reads only the .metadata files).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

PYPI = "https://pypi.org"


def _get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def _metadata(url: str) -> str:
    """A wheel's METADATA headers (the description body is dropped): the PEP 658 file, else from the wheel."""
    import io
    import zipfile
    try:
        text = _get(url + ".metadata").decode()
    except OSError:
        with zipfile.ZipFile(io.BytesIO(_get(url))) as z:
            name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(name).decode()
    head = text.replace("\r\n", "\n").split("\n\n", 1)[0].splitlines()
    keep, skipping = [], False
    for line in head:  # drop a Description: header and its continuation lines
        if not line.startswith((" ", "\t")):
            skipping = line.startswith(("Description:", "License:"))
        if not skipping:
            keep.append(line)
    return "\n".join(keep) + "\n"


def record(out: Path, items: list[str]) -> None:
    """Add projects (NAME or NAME==VERSION) to the fixture, from PyPI's simple API (PEP 691 JSON)."""
    doc = json.loads(out.read_text()) if out.exists() else {"source": f"{PYPI}/simple/NAME/ (PEP 691)", "projects": {}}
    for item in items:
        name, _, version = item.partition("==")
        data = json.loads(_get(f"{PYPI}/simple/{name}/", "application/vnd.pypi.simple.v1+json"))
        if version.startswith("latest"):  # the newest release with a wheel (for Python X.Y: latest:X.Y), only it
            from packaging.specifiers import SpecifierSet
            py = version.partition(":")[2]
            version = str(max(_key(_version(f["filename"])) for f in data["files"]
                              if f["filename"].endswith(".whl") and not _key(_version(f["filename"])).is_prerelease
                              and not f.get("yanked")
                              and (not py or SpecifierSet(f.get("requires-python") or "").contains(py + ".0"))))
        proj = doc["projects"].setdefault(name.lower(), {"files": [], "metadata": {}})
        known = {f["filename"] for f in proj["files"]}
        wanted = []
        for f in data["files"]:
            ver = _version(f["filename"])
            if version and ver != version:
                continue
            if f["filename"] not in known:
                proj["files"].append({"filename": f["filename"], "sha256": f["hashes"]["sha256"], "version": ver,
                                      "requires_python": f.get("requires-python"), "yanked": bool(f.get("yanked"))})
            if f["filename"].endswith(".whl"):
                wanted.append(f)
        if not version and wanted:
            newest = max(_key(_version(f["filename"])) for f in wanted)
            wanted = [f for f in wanted if _key(_version(f["filename"])) == newest]
        for f in wanted:  # one METADATA per release (its wheels share it)
            ver = _version(f["filename"])
            if ver not in proj["metadata"]:
                proj["metadata"][ver] = _metadata(f["url"])
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _version(filename: str) -> str:
    from packaging.utils import parse_sdist_filename, parse_wheel_filename
    try:
        return str(parse_wheel_filename(filename)[1] if filename.endswith(".whl") else parse_sdist_filename(filename)[1])
    except Exception:
        return ""


def _key(version: str):
    from packaging.version import Version
    return Version(version)


def write_index(fixture: Path, root: Path) -> Path:
    """A PEP 503 simple index under root/simple, with PEP 658 .metadata files beside the (absent) wheels."""
    import hashlib
    doc = json.loads(fixture.read_text())
    simple = root / "simple"
    for name, proj in doc["projects"].items():
        d = simple / name
        d.mkdir(parents=True, exist_ok=True)
        files = root / "files"
        files.mkdir(parents=True, exist_ok=True)
        links = []
        for f in proj["files"]:
            attrs = ""
            if f.get("requires_python"):
                attrs += f' data-requires-python="{f["requires_python"].replace(">", "&gt;").replace("<", "&lt;")}"'
            if f.get("yanked"):
                attrs += ' data-yanked=""'
            meta = proj["metadata"].get(f["version"]) if f["filename"].endswith(".whl") else None
            if meta is not None:
                (files / (f["filename"] + ".metadata")).write_text(meta)
                attrs += f' data-dist-info-metadata="sha256={hashlib.sha256(meta.encode()).hexdigest()}"'
            links.append(f'<a href="../../files/{f["filename"]}#sha256={f["sha256"]}"{attrs}>{f["filename"]}</a><br/>')
        (d / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    return simple


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "record":
        record(Path(argv[1]), argv[2:])
        return 0
    if len(argv) == 3 and argv[0] == "serve":
        print(write_index(Path(argv[1]), Path(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
