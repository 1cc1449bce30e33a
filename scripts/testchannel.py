"""A conda channel of real packages, shaped like the LoRA stack, built offline, for tests and benchmarks.

    python scripts/testchannel.py build DIR          # build the channel (and a pip index) into DIR
    python scripts/testchannel.py serve DIR [PORT]   # serve DIR on http://127.0.0.1:PORT until Ctrl-C
    python scripts/testchannel.py publish DIR NAME VERSION   # add a newer NAME (noarch python) to DIR/channel

LORASTRAP_TESTCHANNEL_FILES=N adds N small files to each package (benchmarks at realistic file counts), each of
LORASTRAP_TESTCHANNEL_FILE_KIB KiB (default 2; benchmarks at realistic sizes).  LORASTRAP_TESTCHANNEL_BIG=NAME=MIB,...
gives those packages one incompressible file of MIB MiB each (a CUDA environment's few huge archives).

Packages are made with py-rattler-build's assemble_package with a fixed timestamp (identical bytes every run) and
indexed with rattler.  ~40 packages for linux-64 and linux-aarch64 plus noarch ones: run-export-style pins
(`libgcc >=13`), noarch python and generic packages, `pytorch` and `bitsandbytes` with a cuda build (higher build
number, depends on __cuda) and a cpu build, a few MB of incompressible payload in the CUDA libraries, and prefix
placeholders: an entry point with a `#!PREFIX/bin/python` shebang, a text file and a binary file holding PREFIX.

The `python` package is a real interpreter in venv form: `bin/python` links to the Python that built the channel
and `pyvenv.cfg` makes the environment its own sys.prefix — so modules in the environment really import.

assemble_package does not register prefix placeholders for files it is handed, so `_register_placeholders`
rewrites each archive's info/paths.json (and info/has_prefix) the way rattler-build does for recipe builds.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hashlib
import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from pathlib import Path

TIMESTAMP = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
PLACEHOLDER = "/tmp/lorastrap-test-build/host_env" + "_placehold" * 16  # long enough for binary replacement
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PY_FULL = ".".join(str(v) for v in sys.version_info[:3])
PLATFORMS = ("linux-64", "linux-aarch64")
MB = 1024 * 1024

# name, version, depends, kind ("lib": arch-specific library, "py": arch-specific python module,
# "noarch-py": noarch python, "noarch": noarch generic), payload bytes
STACK = [
    ("libgcc", "14.2.0", [], "lib", 0),
    ("libstdcxx", "14.2.0", ["libgcc 14.2.0"], "lib", 0),
    ("libzlib", "1.3.1", ["libgcc >=13"], "lib", 0),
    ("bzip2", "1.0.8", ["libgcc >=13"], "lib", 0),
    ("xz", "5.6.3", ["libgcc >=13"], "lib", 0),
    ("libffi", "3.4.6", ["libgcc >=13"], "lib", 0),
    ("ncurses", "6.5", ["libgcc >=13"], "lib", 0),
    ("readline", "8.2", ["libgcc >=13", "ncurses >=6.5,<7"], "lib", 0),
    ("libsqlite", "3.47.2", ["libgcc >=13", "libzlib >=1.3.1,<2"], "lib", 0),
    ("openssl", "3.4.0", ["libgcc >=13", "ca-certificates"], "lib", 0),
    ("ca-certificates", "2026.1.1", [], "noarch", 0),
    ("tzdata", "2026a", [], "noarch", 0),
    ("cuda-version", "12.9", [], "noarch", 0),  # constrains __cuda >=12, as conda-forge's does
    ("cuda-cudart", "12.9.79", ["cuda-version >=12.9,<12.10", "libgcc >=13"], "lib", 1 * MB),
    ("libcublas", "12.9.1.4", ["cuda-version >=12.9,<12.10", "cuda-cudart >=12.9,<13"], "lib", 4 * MB),
    ("numpy", "2.3.5", ["python", "libgcc >=13", "libstdcxx >=13"], "py", 0),
    ("sympy", "1.14.0", ["python >=3.10"], "noarch-py", 0),
    ("networkx", "3.6", ["python >=3.10"], "noarch-py", 0),
    ("filelock", "3.20.0", ["python >=3.10"], "noarch-py", 0),
    ("fsspec", "2025.12.0", ["python >=3.10"], "noarch-py", 0),
    ("typing_extensions", "4.15.0", ["python >=3.10"], "noarch-py", 0),
    ("jinja2", "3.1.6", ["python >=3.10", "markupsafe >=2.0"], "noarch-py", 0),
    ("markupsafe", "3.0.3", ["python", "libgcc >=13"], "py", 0),
    ("packaging", "25.0", ["python >=3.10"], "noarch-py", 0),
    ("pyyaml", "6.0.3", ["python", "libgcc >=13"], "py", 0),
    ("regex", "2025.11.3", ["python", "libgcc >=13"], "py", 0),
    ("tqdm", "4.67.1", ["python >=3.10"], "noarch-py", 0),
    ("requests", "2.32.5", ["python >=3.10", "urllib3 >=1.21.1,<3", "idna >=2.5,<4", "certifi >=2017.4.17"],
     "noarch-py", 0),
    ("urllib3", "2.5.0", ["python >=3.10"], "noarch-py", 0),
    ("idna", "3.11", ["python >=3.10"], "noarch-py", 0),
    ("certifi", "2025.11.12", ["python >=3.10"], "noarch-py", 0),
    ("psutil", "7.1.3", ["python", "libgcc >=13"], "py", 0),
    ("safetensors", "0.7.0", ["python", "libgcc >=13"], "py", 0),
    ("tokenizers", "0.22.1", ["python", "libgcc >=13", "libstdcxx >=13", "huggingface_hub"], "py", 0),
    ("huggingface_hub", "1.2.0", ["python >=3.10", "filelock", "fsspec", "packaging", "pyyaml", "requests",
                                  "tqdm", "typing_extensions"], "noarch-py", 0),
    ("transformers", "5.24.0", ["python >=3.10", "huggingface_hub >=1.0", "numpy >=1.17", "packaging",
                                "pyyaml", "regex", "safetensors >=0.4.3", "tokenizers >=0.22", "tqdm"],
     "noarch-py", 0),
    ("accelerate", "1.15.0", ["python >=3.10", "numpy", "packaging", "psutil", "pyyaml", "pytorch >=2.0",
                              "huggingface_hub", "safetensors"], "noarch-py", 0),
    ("peft", "0.21.2", ["python >=3.10", "accelerate >=0.21", "numpy", "packaging", "psutil", "pytorch >=1.13",
                        "safetensors", "tqdm", "transformers"], "noarch-py", 0),
    ("pip", "25.3", ["python >=3.10"], "noarch-py", 0),
]


def _files(root: Path, name: str, version: str, kind: str, payload: int, extra: str = "") -> Path:
    """Stage the files of one package in a fresh folder."""
    d = root / "files"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    mod = name.replace("-", "_")
    if kind in ("py", "noarch-py"):
        base = d / "site-packages" if kind == "noarch-py" else d / "lib" / f"python{PY}" / "site-packages"
        (base / mod).mkdir(parents=True)
        (base / mod / "__init__.py").write_text(f'__version__ = "{version}"\n{extra}')
    else:
        (d / "share" / "lorastrap-test" / name).mkdir(parents=True)
        (d / "share" / "lorastrap-test" / name / "VERSION").write_text(version + "\n")
    if payload:
        (d / "lib").mkdir(exist_ok=True)
        rng = random.Random(f"{name}-{version}")
        (d / "lib" / f"lib{mod}.so").write_bytes(rng.randbytes(payload))
    big = dict(item.split("=") for item in os.environ.get("LORASTRAP_TESTCHANNEL_BIG", "").split(",") if item)
    if name in big:  # benchmarks: a CUDA environment's few huge archives (incompressible MiB)
        (d / "lib").mkdir(exist_ok=True)
        with open(d / "lib" / f"lib{mod}-big.so", "wb") as f:
            rng = random.Random(f"big-{name}-{version}")
            for _ in range(int(big[name])):
                f.write(rng.randbytes(2**20))
    extra_files = int(os.environ.get("LORASTRAP_TESTCHANNEL_FILES", "0"))  # benchmarks: real-size file counts
    if extra_files:
        bulk = d / "share" / "lorastrap-bulk" / name
        bulk.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"bulk-{name}-{version}")
        size = int(os.environ.get("LORASTRAP_TESTCHANNEL_FILE_KIB", "2")) * 1024
        for i in range(extra_files):
            (bulk / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))
    return d


def _register_placeholders(archive: Path) -> None:
    """Add prefix_placeholder/file_mode to info/paths.json (and info/has_prefix) for files holding PLACEHOLDER."""
    import zstandard

    ph = PLACEHOLDER.encode()
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        blobs = {i.filename: z.read(i) for i in infos}
    pkg_name = next(n for n in blobs if n.startswith("pkg-"))
    info_name = next(n for n in blobs if n.startswith("info-"))
    dctx = zstandard.ZstdDecompressor()
    holders = {}
    with tarfile.open(fileobj=dctx.stream_reader(io.BytesIO(blobs[pkg_name])), mode="r|") as t:
        for m in t:
            if m.isfile():
                data = t.extractfile(m).read()
                if ph in data:
                    holders[m.name] = "binary" if b"\0" in data else "text"
    if not holders:
        return
    members = []
    with tarfile.open(fileobj=dctx.stream_reader(io.BytesIO(blobs[info_name])), mode="r|") as t:
        for m in t:
            members.append((m, t.extractfile(m).read() if m.isfile() else None))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        names = [m.name for m, _ in members]
        for m, data in members:
            if m.name == "info/paths.json":
                doc = json.loads(data)
                for p in doc["paths"]:
                    if p["_path"] in holders:
                        p["prefix_placeholder"] = PLACEHOLDER
                        p["file_mode"] = holders[p["_path"]]
                data = json.dumps(doc, indent=2, sort_keys=True).encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data is not None else None)
        if "info/has_prefix" not in names:
            data = "".join(f"{PLACEHOLDER} {mode} {path}\n" for path, mode in sorted(holders.items())).encode()
            m = tarfile.TarInfo("info/has_prefix")
            m.size, m.mtime, m.mode = len(data), int(TIMESTAMP.timestamp()), 0o644
            t.addfile(m, io.BytesIO(data))
    blobs[info_name] = zstandard.ZstdCompressor(level=3).compress(out.getvalue())
    tmp = archive.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for i in infos:
            z.writestr(zipfile.ZipInfo(i.filename, date_time=i.date_time), blobs[i.filename])
    os.replace(tmp, archive)


CONSTRAINS = {"cuda-version": ["__cuda >=12"]}


# --------------------------------------------------------------------------------------------------------------
# Hostile packages (real .conda archives, for the containment tests): each is a plain generic package whose tar
# and info/paths.json are then given members no honest build makes.

def _with_members(archive: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], *,
                  paths_only: list[dict] = ()) -> None:
    """Append MEMBERS (TarInfo, data) to the archive's pkg tar and list them in info/paths.json; PATHS_ONLY entries
    go into paths.json alone (a paths.json that names what the tar does not hold)."""
    import zstandard

    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        blobs = {i.filename: z.read(i) for i in infos}
    dctx, cctx = zstandard.ZstdDecompressor(), zstandard.ZstdCompressor(level=1)

    def rewrite(name: str, edit) -> None:
        old = []
        with tarfile.open(fileobj=dctx.stream_reader(io.BytesIO(blobs[name])), mode="r|") as t:
            for m in t:
                old.append((m, t.extractfile(m).read() if m.isfile() else None))
        raw = io.BytesIO()
        with cctx.stream_writer(raw, closefd=False) as w, tarfile.open(fileobj=w, mode="w|",
                                                                        format=tarfile.PAX_FORMAT) as t:
            for m, data in edit(old):
                t.addfile(m, io.BytesIO(data) if data is not None else None)
        blobs[name] = raw.getvalue()

    def add_files(old):
        yield from old
        yield from members

    def add_paths(old):
        for m, data in old:
            if m.name == "info/paths.json":
                doc = json.loads(data)
                for tm, body in members:
                    if tm.isdir():  # paths.json lists files and links only
                        continue
                    entry = {"_path": tm.name, "path_type": "softlink" if tm.issym() else "hardlink"}
                    if tm.isfile():
                        entry.update(sha256=hashlib.sha256(body).hexdigest(), size_in_bytes=len(body))
                    doc["paths"].append(entry)
                doc["paths"].extend(paths_only)
                data = json.dumps(doc, indent=2, sort_keys=True).encode()
                m.size = len(data)
            yield m, data

    rewrite(next(n for n in blobs if n.startswith("pkg-")), add_files)
    rewrite(next(n for n in blobs if n.startswith("info-")), add_paths)
    tmp = archive.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for i in infos:
            z.writestr(zipfile.ZipInfo(i.filename, date_time=i.date_time), blobs[i.filename])
    os.replace(tmp, archive)


class _Zeros(io.RawIOBase):
    """N zero bytes, streamed (an oversized member without holding it in memory)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _member(name: str, data: bytes | None = None, *, link: str | None = None, kind=tarfile.REGTYPE):
    m = tarfile.TarInfo(name)
    m.mtime, m.mode = int(TIMESTAMP.timestamp()), 0o755 if name.endswith(".sh") else 0o644
    if link is not None:
        m.type, m.linkname = tarfile.SYMTYPE, link
    else:
        m.type = kind
        m.size = len(data or b"")
    return m, data


def hostile(out_dir: Path, kind: str, outside: Path, platform: str = "linux-64") -> Path:
    """One hostile package named hostile-KIND (version 1.0) in out_dir/PLATFORM; OUTSIDE is a folder outside every
    prefix that a package of this kind tries to reach.  Kinds:
      paths-traversal   info/paths.json names ../OUTSIDE-relative paths (the tar does not)
      tar-traversal     a tar member ../../… and its paths.json entry
      symlink-out       share/outlink → OUTSIDE, then share/outlink/pwned.txt written through it
      link-maker        only share/outlink → OUTSIDE (link-user writes through it: the two together)
      link-user         share/outlink/pwned.txt
      script            bin/.hostile-script-post-link.sh that writes OUTSIDE/ran
      inner-link        lib/ok.txt and lib64 → lib (a link inside the package: allowed)
      oversized         share/zeros: 512 MiB of zeros in a tiny archive
      fifo              a FIFO member
      modes             not hostile, unusual: a group-writable file, a setuid one, a hard link, a folder of mode
                        775, members owned by uid 4321, mtimes before 1980, fractional or past 8**11 s (what an
                        unpacker must lay out as the engines do)"""
    name = f"hostile-{kind}"
    with tempfile.TemporaryDirectory(prefix="lorastrap-hostile-") as tmp:
        work = Path(tmp)
        files = _files(work, name, "1.0", "noarch", 0)
        (out_dir / platform).mkdir(parents=True, exist_ok=True)
        path = assemble(work, out_dir / platform, name, "1.0", platform, "h0_0", files, [])
    rel_out = os.path.relpath(outside, "/")  # enough ../ to climb out of any prefix
    up = "../" * 40
    if kind == "paths-traversal":
        body = b"pwned\n"
        _with_members(path, [], paths_only=[{"_path": f"{up}{rel_out}/pwned.txt", "path_type": "hardlink",
                                             "sha256": hashlib.sha256(body).hexdigest(), "size_in_bytes": 6}])
    elif kind == "tar-traversal":
        _with_members(path, [_member(f"{up}{rel_out}/pwned.txt", b"pwned\n")])
    elif kind == "symlink-out":
        _with_members(path, [_member("share/outlink", link=str(outside)), _member("share/outlink/pwned.txt",
                                                                                  b"pwned\n")])
    elif kind == "link-maker":
        _with_members(path, [_member("share/outlink", link=str(outside))])
    elif kind == "link-user":
        _with_members(path, [_member("share/outlink/pwned.txt", b"pwned\n")])
    elif kind == "script":
        _with_members(path, [_member("bin/.hostile-script-post-link.sh",
                                     f"#!/bin/sh\necho ran > '{outside}/ran'\n".encode())])
    elif kind == "inner-link":
        _with_members(path, [_member("lib/ok.txt", b"ok\n"), _member("lib64", link="lib")])
    elif kind == "oversized":
        m, _ = _member("share/zeros", b"")
        m.size = 512 * MB
        _with_members_stream(path, m)
    elif kind == "fifo":
        _with_members(path, [_member("share/pipe", kind=tarfile.FIFOTYPE)])
    elif kind == "modes":
        members = [_member("share/odd", kind=tarfile.DIRTYPE), _member("share/odd/shared.txt", b"group\n"),
                   _member("share/odd/suid.sh", b"#!/bin/sh\n"), _member("share/odd/again.txt", b"")]
        members[0][0].mode, members[1][0].mode, members[2][0].mode = 0o775, 0o664, 0o4755
        members[3][0].type, members[3][0].linkname = tarfile.LNKTYPE, "share/odd/shared.txt"
        members[3][0].mtime = 1700000000  # a hard link's own mtime: the engines give it to the file
        for m, _ in members:
            m.uid, m.gid, m.uname, m.gname = 4321, 4321, "builder", "builder"
        for i, mtime in enumerate((0, 315532799, 1600000000.5, 1600000001.5, 8 ** 11 - 1, 8 ** 11)):
            members.append(_member(f"share/odd/time{i}.txt", b"t\n"))
            members[-1][0].mtime = mtime
        _with_members(path, members)
    else:
        raise ValueError(kind)
    return path


def _with_members_stream(archive: Path, member: tarfile.TarInfo) -> None:
    """_with_members for one large member of zeros, streamed through the compressor."""
    import zstandard

    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        blobs = {i.filename: z.read(i) for i in infos}
    pkg = next(n for n in blobs if n.startswith("pkg-"))
    dctx = zstandard.ZstdDecompressor()
    old = []
    with tarfile.open(fileobj=dctx.stream_reader(io.BytesIO(blobs[pkg])), mode="r|") as t:
        for m in t:
            old.append((m, t.extractfile(m).read() if m.isfile() else None))
    raw = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as w, \
            tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as t:
        for m, data in old:
            t.addfile(m, io.BytesIO(data) if data is not None else None)
        t.addfile(member, io.BufferedReader(_Zeros(member.size), buffer_size=1 << 20))
    blobs[pkg] = raw.getvalue()
    tmp = archive.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for i in infos:
            z.writestr(zipfile.ZipInfo(i.filename, date_time=i.date_time), blobs[i.filename])
    os.replace(tmp, archive)
    _with_members(archive, [], paths_only=[{"_path": member.name, "path_type": "hardlink",
                                            "size_in_bytes": member.size}])


def assemble(work: Path, out_dir: Path, name: str, version: str, platform: str, build: str, files: Path,
             depends: list[str], build_number: int = 0, noarch: str | None = None,
             constrains: list[str] | None = None) -> Path:
    """One real .conda package (fixed timestamp: identical bytes every run), placeholders registered."""
    import rattler_build
    out = rattler_build.assemble_package(name, version, platform, build, str(out_dir), files_dir=str(files),
                                         depends=depends, constrains=constrains or CONSTRAINS.get(name),
                                         build_number=build_number, noarch=noarch,
                                         timestamp=TIMESTAMP, compression_level=1)
    path = Path(out.path)
    _register_placeholders(path)
    return path


def _build_python(work: Path, ch: Path, platform: str) -> None:
    d = work / "files"
    if d.exists():
        shutil.rmtree(d)
    (d / "bin").mkdir(parents=True)
    (d / "lib" / f"python{PY}" / "site-packages").mkdir(parents=True)
    (d / "lib" / f"python{PY}" / "site-packages" / "_lorastrap_test_python.pth").write_text("")
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    os.symlink(str(base), d / "bin" / "python")
    os.symlink("python", d / "bin" / f"python{PY}")
    os.symlink("python", d / "bin" / "python3")
    (d / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                  f"version = {PY_FULL}\n")
    assemble(work, ch / platform, "python", PY_FULL, platform, f"h0_0_cp{PY.replace('.', '')}", d,
              ["libgcc >=13", "libzlib >=1.3.1,<2", "libffi >=3.4,<4", "openssl >=3.4,<4", "libsqlite >=3.47",
               "bzip2 >=1.0.8,<2", "xz >=5.6", "readline >=8.2,<9", "ncurses >=6.5", "tzdata"])


def _build_stack_variants(work: Path, ch: Path, platform: str) -> None:
    """pytorch and bitsandbytes: a cuda build (build number +200, needs __cuda) and a cpu build."""
    for name, version, payload in (("pytorch", "2.10.0", 3 * MB), ("bitsandbytes", "0.49.2", 1 * MB)):
        mod = "torch" if name == "pytorch" else name
        for variant in ("cuda", "cpu"):
            cuda = variant == "cuda"
            extra = (f'BUILD = "{variant}"\n'
                     + (f'supported_torch_devices = {["cpu", "cuda"] if cuda else ["cpu"]!r}\n' if name == "bitsandbytes" else "")
                     + ("class version:\n    cuda = " + ('"12.9"' if cuda else "None") + "\n" if name == "pytorch" else ""))
            files = _files(work, mod, version, "py", 0, extra)
            lib = files / "lib"
            lib.mkdir(exist_ok=True)
            rng = random.Random(f"{name}-{variant}")
            # A binary file holding the build prefix (null-padded replacement) and a text file holding it.
            (lib / f"lib{mod}_{variant}.so").write_bytes(
                rng.randbytes(payload // 2) + b"\0RPATH=" + PLACEHOLDER.encode() + b"/lib\0" + rng.randbytes(payload // 2))
            (files / "etc").mkdir(exist_ok=True)
            (files / "etc" / f"{mod}.conf").write_text(f"prefix={PLACEHOLDER}\nvariant={variant}\n")
            depends = ["python", "numpy >=1.22", "libgcc >=13", "libstdcxx >=13"]
            if name == "pytorch":
                depends += ["filelock", "fsspec", "jinja2", "networkx", "sympy", "typing_extensions"]
            else:
                depends += ["pytorch >=2.3", "packaging"]
            if cuda:
                depends += ["__cuda", "cuda-version >=12.9,<13", "cuda-cudart >=12.9,<13", "libcublas >=12.9,<13"]
                if name == "bitsandbytes":
                    depends += ["pytorch * cuda*"]
            elif name == "bitsandbytes":
                depends += ["pytorch * cpu*"]
            assemble(work, ch / platform, name, version, platform,
                      f"{variant}_py{PY.replace('.', '')}h0_{200 if cuda else 0}", files, depends,
                      build_number=200 if cuda else 0)


def _build_smoke(work: Path, ch: Path) -> None:
    """lora-smoke: an entry point with a #!PREFIX/bin/python shebang that imports the stack and reports it."""
    d = work / "files"
    if d.exists():
        shutil.rmtree(d)
    (d / "bin").mkdir(parents=True)
    script = f"""#!{PLACEHOLDER}/bin/python
# lora-smoke: imports the (test) LoRA stack and reports where it lives.
import json, os, sys
import torch, transformers, peft, accelerate, bitsandbytes
prefix = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
conf = open(os.path.join(prefix, "etc", "torch.conf")).read()
ok = ("prefix=" + sys.prefix) in conf and sys.prefix == prefix
report = {{"ok": ok, "prefix": sys.prefix, "torch": torch.__version__, "torch_build": torch.BUILD,
          "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.BUILD, "transformers": transformers.__version__}}
if "--expect-cuda" in sys.argv and torch.BUILD != "cuda":
    report["ok"] = False
print(json.dumps(report))
sys.exit(0 if report["ok"] else 1)
"""
    (d / "bin" / "lora-smoke").write_text(script)
    os.chmod(d / "bin" / "lora-smoke", 0o755)
    # Activation scripts, as CUDA packages carry them: only activation (run, shell-hook) sets this variable.
    hooks = d / "etc" / "conda" / "activate.d"
    hooks.mkdir(parents=True)
    (hooks / "lora-smoke.sh").write_text('export LORA_SMOKE_DATA="${CONDA_PREFIX}/share/lora-smoke"\n')
    (hooks / "lora-smoke.fish").write_text('set -gx LORA_SMOKE_DATA "$CONDA_PREFIX/share/lora-smoke"\n')
    assemble(work, ch / "noarch", "lora-smoke", "1.0", "noarch", "0", d,
              ["python", "pytorch", "transformers", "peft", "accelerate", "bitsandbytes"], noarch="generic")


def _build_wheel(out: Path) -> None:
    """A tiny pure-Python wheel and a PEP 503 simple index for it: the pip side of a spec."""
    name, version = "lorastrap_testwheel", "1.0"
    files = {f"{name}/__init__.py": f'__version__ = "{version}"\n',
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: lorastrap-testwheel\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: lorastrap\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel_dir = out / "simple" / "lorastrap-testwheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    whl = wheel_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0)), text)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (wheel_dir / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{whl.name}#sha256={sha}">{whl.name}</a></body></html>\n')
    (out / "simple" / "index.html").write_text(
        '<!DOCTYPE html><html><body><a href="lorastrap-testwheel/">lorastrap-testwheel</a></body></html>\n')


def new_channel(out: Path, platforms: tuple[str, ...]) -> Path:
    """out/channel with its noarch and platform subdirs."""
    ch = out / "channel"
    for sub in ("noarch",) + platforms:
        (ch / sub).mkdir(parents=True, exist_ok=True)
    return ch


def publish(channel: Path, name: str, version: str) -> Path:
    """Add a newer version of a noarch python package of STACK to a built channel and index it again (a channel
    that gained a release since an environment was locked)."""
    import rattler

    depends = next(d for n, _, d, kind, _ in STACK if n == name and kind == "noarch-py")
    with tempfile.TemporaryDirectory(prefix="lorastrap-testchannel-") as tmp:
        work = Path(tmp)
        path = assemble(work, channel / "noarch", name, version, "noarch", "pyh0_0",
                         _files(work, name, version, "noarch-py", 0), depends, noarch="python")
    asyncio.run(rattler.index.index_fs(channel, write_zst=False, write_shards=False, force=True))
    return path


def build(out: Path) -> Path:
    """Build the channel into out/channel and the pip index into out/simple.  Returns out/channel."""
    import rattler

    ch = new_channel(out, PLATFORMS)
    with tempfile.TemporaryDirectory(prefix="lorastrap-testchannel-") as tmp:
        work = Path(tmp)
        for name, version, depends, kind, payload in STACK:
            if kind.startswith("noarch"):
                noarch = "python" if kind == "noarch-py" else "generic"
                assemble(work, ch / "noarch", name, version, "noarch", "pyh0_0" if noarch == "python" else "h0_0",
                          _files(work, name, version, kind, payload), depends, noarch=noarch)
                continue
            for platform in PLATFORMS:
                build_str = f"py{PY.replace('.', '')}h0_0" if kind == "py" else "h0_0"
                assemble(work, ch / platform, name, version, platform, build_str,
                          _files(work, name, version, kind, payload), depends)
        for platform in PLATFORMS:
            _build_python(work, ch, platform)
            _build_stack_variants(work, ch, platform)
        _build_smoke(work, ch)
    asyncio.run(rattler.index.index_fs(ch, write_zst=False, write_shards=False, force=True))
    _build_wheel(out)
    return ch


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(root: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve root on 127.0.0.1 in a background thread; returns (server, base URL).  server.shutdown() stops it."""
    handler = functools.partial(_QuietHandler, directory=str(root))

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # socketserver's 5 drops SYNs when many downloads start at once (see netsim.py)
    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def offline_bundle(work: Path, profile: str = "test-cpu") -> Path:
    """For the fleet benchmarks: build the channel in WORK/tc (in a child: py-rattler stays out of this process),
    serve it just long enough to bundle PROFILE into WORK/bundle with `lorastrap bundle`, and stop serving."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "scripts" / "testchannel.py"), "build", str(work / "tc")],
                   check=True, capture_output=True)
    server, url = serve(work / "tc")
    try:
        subprocess.run([sys.executable, "-m", "lorastrap", "bundle", "--envs-dir", str(root / "tests" / "envs"),
                        "--profile", profile, "--channel", f"{url}/channel", "--pip-index-url", f"{url}/simple",
                        "-o", str(work / "bundle")], cwd=root, check=True, capture_output=True,
                       env=dict(os.environ, LORASTRAP_HOME=str(work / "head")))
    finally:
        server.shutdown()  # the fleet runs offline
    return work / "bundle"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "build":
        ch = build(Path(argv[1]).absolute())
        count = sum(1 for _ in ch.rglob("*.conda"))
        print(f"{count} packages in {ch}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)  # py-rattler may crash at interpreter shutdown (field notes)
    if len(argv) == 4 and argv[0] == "publish":
        print(publish(Path(argv[1]).absolute() / "channel", argv[2], argv[3]), file=sys.stderr)
        sys.stderr.flush()
        os._exit(0)  # py-rattler may crash at interpreter shutdown (field notes)
    if len(argv) >= 2 and argv[0] == "serve":
        server, url = serve(Path(argv[1]), int(argv[2]) if len(argv) > 2 else 8765)
        print(f"channel: {url}/channel   pip index: {url}/simple", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
