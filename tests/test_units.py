"""In-process unit tests of the small pieces the transaction rests on: the journal's recovery, the file lock,
the package cache, mirror URL rewriting, wheel tags, the verify report parser, the version parser."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import MAMBA, ROOT, alive, dies_within

from lorastrap.install import cache, txn, verify
from lorastrap.core import fsutil, locks, records, versions
from lorastrap.locking import channels as chans, wheels
from lorastrap.core.errors import BusyError, IntegrityError, NetworkError, UsageError


def env(path: Path, marker: str) -> Path:
    """A minimal conda environment (conda-meta/ and one file saying which one it is)."""
    (path / "conda-meta").mkdir(parents=True)
    (path / "which").write_text(marker)
    return path


# --------------------------------------------------------------------------------------------------------------
# Journal recovery: every state a crash can leave

def test_no_journal_means_nothing_to_recover(tmp_path):
    prefix = env(tmp_path / "env", "old")
    assert txn.recover(prefix) is None
    assert (prefix / "which").read_text() == "old"


@pytest.mark.parametrize("state", ["aside", "linking", "verifying"])
def test_crash_before_commit_restores_the_backup(tmp_path, state):
    prefix = tmp_path / "env"
    env(txn.backup_path(prefix), "old")
    env(prefix, "partial-new")
    txn.write_journal(prefix, records.Journal(state=state, had_old=True, pid=1))
    assert txn.recover(prefix) == "restored the previous environment"
    assert (prefix / "which").read_text() == "old"
    assert not txn.backup_path(prefix).exists() and not txn.journal_path(prefix).exists()
    assert not list(tmp_path.glob("*trash*"))


def test_crash_before_the_rename_leaves_the_old_environment_alone(tmp_path):
    prefix = env(tmp_path / "env", "old")
    txn.write_journal(prefix, records.Journal(state="aside", had_old=True))
    assert txn.recover(prefix) == "the previous environment was still in place"
    assert (prefix / "which").read_text() == "old"


def test_crash_of_a_first_install_removes_the_partial_one(tmp_path):
    prefix = env(tmp_path / "env", "partial")
    txn.write_journal(prefix, records.Journal(state="linking", had_old=False))
    assert txn.recover(prefix) == "removed a partial environment"
    assert not prefix.exists()


def test_a_first_install_never_restores_an_unrelated_older_backup(tmp_path):
    prefix = env(tmp_path / "env", "partial")
    env(txn.backup_path(prefix), "kept-from-long-ago")
    txn.write_journal(prefix, records.Journal(state="linking", had_old=False))
    txn.recover(prefix)
    assert not prefix.exists()
    assert (txn.backup_path(prefix) / "which").read_text() == "kept-from-long-ago"


@pytest.mark.parametrize("keep", [False, True])
def test_crash_while_committing_finishes_the_commit(tmp_path, keep):
    prefix = tmp_path / "env"
    env(txn.backup_path(prefix), "old")
    env(prefix, "new")
    txn.write_journal(prefix, records.Journal(state="committing", had_old=True, keep_backup=keep))
    assert txn.recover(prefix) == "completed the interrupted commit"
    assert (prefix / "which").read_text() == "new"
    assert txn.backup_path(prefix).exists() == keep


def test_a_corrupt_journal_rolls_back(tmp_path):
    prefix = tmp_path / "env"
    env(txn.backup_path(prefix), "old")
    env(prefix, "partial-new")
    txn.journal_path(prefix).write_text('{"state": "commit')  # torn write
    assert txn.recover(prefix) == "restored the previous environment"
    assert (prefix / "which").read_text() == "old"


def test_leftover_trash_is_cleaned(tmp_path):
    prefix = env(tmp_path / "env", "old")
    for name in ("env.lorastrap-trash-1-2", "env.lorastrap-backup.lorastrap-trash-3-4"):
        (tmp_path / name / "x").mkdir(parents=True)
    txn.recover(prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "x.json"
    fsutil.write_atomic(target, "1")
    fsutil.write_atomic(target, "2")
    assert target.read_text() == "2" and os.listdir(tmp_path) == ["x.json"]


# --------------------------------------------------------------------------------------------------------------
# The file lock, across real processes

HOLD = "import sys, time; from lorastrap.core import locks; from pathlib import Path\n" \
       "with locks.held(Path(sys.argv[1]), what='p'):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"


def _holder(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_fails_fast_naming_the_holder(tmp_path):
    path = tmp_path / "p.lorastrap.lock"
    proc = _holder(path, 30)
    try:
        with pytest.raises(BusyError) as info:
            with locks.held(path, what="p", wait=False):
                pass
        assert f"(pid {proc.pid})" in info.value.what
    finally:
        proc.kill()
        proc.wait()


def test_lock_waits_says_so_and_gets_it_when_released(tmp_path):
    path = tmp_path / "p.lorastrap.lock"
    proc = _holder(path, 1.0)
    said = []
    start = time.monotonic()
    with locks.held(path, what="p", narrate=said.append):
        waited = time.monotonic() - start
        assert path.read_text().strip() == str(os.getpid())
    proc.wait()
    assert said and f"(pid {proc.pid})" in said[0] and waited > 0.3


def test_lock_files_are_kept_and_a_waiter_on_a_removed_one_starts_over(tmp_path):
    """The NFS-safe protocol (locks.py): the holder never removes its lock file; when one is removed (uninstall),
    a waiter that then locks the removed inode sees, by opening the path afresh, that it is not the file there."""
    path = tmp_path / "p.lorastrap.lock"
    with locks.held(path, what="p"):
        pass
    assert path.exists()  # kept
    proc = _holder(path, 1.0)
    old_inode = path.stat().st_ino
    path.unlink()  # removed while held, as uninstall does after its run
    other = _holder(path, 30)  # a new file at PATH, held by another run
    try:
        with pytest.raises(BusyError):
            with locks.held(path, what="p", wait=False):
                pass
        proc.wait()  # the old file's holder is gone: its inode is free, but it is not the lock file any more
        with pytest.raises(BusyError):
            with locks.held(path, what="p", wait=True, timeout=1.5):
                pass
        assert path.stat().st_ino != old_inode
    finally:
        other.kill()
        other.wait()


def test_a_killed_holder_releases_the_lock(tmp_path):
    path = tmp_path / "p.lorastrap.lock"
    proc = _holder(path, 60)
    proc.kill()
    proc.wait()
    with locks.held(path, what="p", wait=False):
        pass


# --------------------------------------------------------------------------------------------------------------
# The package cache (over a real loopback HTTP server)

@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _first_fetch(tmp_path, served):
    """A real archive served over HTTP, fetched once into a new cache."""
    root, url = served
    (root / "a.conda").write_bytes(b"real archive")
    good = cache.sha256_file(root / "a.conda")
    c = cache.Cache(tmp_path / "pkgs")
    path, got = c.fetch(f"{url}/a.conda", good, "a.conda")
    return root, url, good, c, path, got


def test_cache_fetches_once_checks_and_refuses_a_swap(tmp_path, served):
    root, url, good, c, path, got = _first_fetch(tmp_path, served)
    assert got == len(b"real archive") and path.read_bytes() == b"real archive"
    assert c.fetch(f"{url}/a.conda", good, "a.conda") == (path, 0)  # cached: nothing downloaded
    (root / "b.conda").write_bytes(b"tampered!!!!")
    with pytest.raises(IntegrityError) as info:
        c.fetch(f"{url}/b.conda", "0" * 64, "b.conda")
    assert "want sha256" in info.value.what
    assert not c.entry("0" * 64, "b.conda").exists()
    assert not list((tmp_path / "pkgs").rglob("*.part"))


def test_cache_entry_edited_in_place_is_fetched_again(tmp_path, served):
    root, url, good, c, path, _ = _first_fetch(tmp_path, served)
    path.write_bytes(b"edited archive")
    assert not c.is_ready(good, "a.conda")
    path2, got = c.fetch(f"{url}/a.conda", good, "a.conda")
    assert got > 0 and path2.read_bytes() == b"real archive"


def test_cache_unreachable_is_a_network_error(tmp_path):
    c = cache.Cache(tmp_path / "pkgs")
    with pytest.raises(NetworkError):
        c.fetch("http://127.0.0.1:9/none.conda", "0" * 64, "none.conda")


# --------------------------------------------------------------------------------------------------------------
# Mirror URL rewriting and lock copies

def test_mirror_rewrites_only_the_lock_channels_urls():
    channels = ["https://conda.anaconda.org/conda-forge"]
    url = "https://conda.anaconda.org/conda-forge/linux-64/pytorch-2.10.0-cuda129_h0_305.conda"
    assert (chans.mirrored(url, channels, "https://mirror.example/cf") ==
            "https://mirror.example/cf/linux-64/pytorch-2.10.0-cuda129_h0_305.conda")
    assert chans.mirrored(url, channels, None) == url
    other = "https://files.pythonhosted.org/packages/x/bitsandbytes-0.50.2-py3-none-any.whl"
    assert chans.mirrored(other, channels, "https://mirror.example/cf") == other
    assert chans.mirrored(url, channels, "/srv/mirror").startswith("file:///srv/mirror/linux-64/")


def test_channel_names_become_urls():
    assert chans.channel_url("conda-forge") == "https://conda.anaconda.org/conda-forge"
    assert chans.channel_url("http://127.0.0.1:8000/ch/") == "http://127.0.0.1:8000/ch"


# --------------------------------------------------------------------------------------------------------------
# Wheel tags from a profile's virtual packages

def test_wheel_tags_follow_the_profiles_glibc_and_macos():
    tags = wheels.wheel_platforms("linux-64", {"__glibc": "2.17"})
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_24_x86_64" not in tags and "manylinux_2_28_x86_64" not in tags
    assert "manylinux_2_28_aarch64" in wheels.wheel_platforms("linux-aarch64", {"__glibc": "2.28"})
    osx = wheels.wheel_platforms("osx-arm64", {"__osx": "12.0"})
    assert "macosx_12_0_arm64" in osx and "macosx_14_0_arm64" not in osx
    with pytest.raises(Exception) as info:
        wheels.wheel_platforms("linux-64", {"__unix": "0"})
    assert "__glibc" in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# The verify report parser, the version parser

def test_verify_report_is_found_after_other_output():
    report = {"schema_version": 1, "verdict": "pass", "checks": []}
    text = "bitsandbytes says hello {not json}\n" + json.dumps(report, indent=2) + "\n"
    assert verify.parse(text) == report
    assert verify.parse("no report here") is None
    assert verify.parse(json.dumps({"other": 1})) is None
    assert verify.exit_code({"verdict": "unsupported"}) == 3 and verify.exit_code({"verdict": "fail"}) == 9


@pytest.mark.parametrize("bad", ["12.x", "abc", "-1", "", "12..4", " 1 2"])
def test_versions_refuse_what_is_not_a_version(bad):
    with pytest.raises(UsageError) as info:
        versions.parse(bad, "CONDA_OVERRIDE_CUDA")
    assert "CONDA_OVERRIDE_CUDA" in info.value.what and info.value.fix


def test_versions_order_numerically():
    assert versions.parse("12.10") > versions.parse("12.9")
    assert sorted(["8.9", "10.0", "7.5"], key=versions.key) == ["7.5", "8.9", "10.0"]


def test_records_round_trip_and_reject_unknown_keys():
    j = records.Journal(state="linking", had_old=True, pid=5)
    assert records.Journal.model_validate_json(j.model_dump_json()) == j
    with pytest.raises(ValueError):
        records.Journal.model_validate({"state": "linking", "had_old": True, "surprise": 1})
    assert yaml.safe_load(records.EnvRecord(profile="cpu", platform="linux-64", lock_digest="d", lock_source="s",
                                            engine="e", installed_at="t").model_dump_json())["schema_version"] == 1


@pytest.mark.parametrize("change", [
    {"files": {"a": {"size": 1, "sha256": "0" * 63}}},  # the pattern of a sha256
    {"files": {"a": {"size": 1, "sha256": "0" * 64 + "\n"}}},  # ... whole: not before a last newline
    {"files": {"a": {"size": "many", "sha256": "0" * 64}}},
    {"files": {"a": {"size": 1, "sha256": "0" * 64, "mode": 1}}},  # an unknown key, nested
    {"schema_version": 2}, {"packages": None}, {"runtime": {"store": "s"}}, {"created": 5}, {"surprise": 1},
])
def test_records_read_back_refuse_what_does_not_fit(change):
    """A record read back is checked in plain Python first; what does not fit is pydantic's to refuse."""
    good = {"profile": "p", "platform": "linux-64", "python_version": "3.12", "created": "c", "lock": "l",
            "channel": "c", "packages": 1, "bytes": 2, "files": {"a": {"size": 1, "sha256": "0" * 64}}}
    manifest = records.BundleManifest.model_validate(good)
    assert isinstance(manifest.files["a"], records.BundleFile)
    assert records.BundleManifest.model_validate_json(manifest.model_dump_json(indent=2)) == manifest
    with pytest.raises(ValueError):
        records.BundleManifest.model_validate({**good, **change})
    with pytest.raises(ValueError):
        records.BundleManifest.model_validate_json(json.dumps({**good, **change}))


def test_a_same_size_swap_with_its_mtime_put_back_is_hashed_again(tmp_path, served):
    root, url, good, c, path, _ = _first_fetch(tmp_path, served)
    st = path.stat()
    time.sleep(0.01)
    with open(path, "r+b") as f:  # same inode, same size, other bytes
        f.write(b"evil")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert not c.is_ready(good, "a.conda")  # the ctime moved
    path2, got = c.fetch(f"{url}/a.conda", good, "a.conda")
    assert got > 0 and path2.read_bytes() == b"real archive"


def test_a_killed_downloads_part_file_is_removed_by_the_next_fetch(tmp_path, served):
    root, url = served
    (root / "a.conda").write_bytes(b"real archive")
    good = cache.sha256_file(root / "a.conda")
    c = cache.Cache(tmp_path / "pkgs")
    stale = c.entry(good, "a.conda").with_name(".a.conda.999999.part")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"real ar")  # what a SIGKILL mid-download leaves
    sidecar = stale.with_name(stale.name + ".segments")  # and beside a part written in segments, its sidecar
    sidecar.write_text("{}")
    sidecar.with_name(f".{sidecar.name}.4242.tmp").write_text("{")  # one being written
    path, _ = c.fetch(f"{url}/a.conda", good, "a.conda")
    assert path.read_bytes() == b"real archive" and not list(path.parent.glob("*.part*"))


def test_the_recorded_groups_of_a_dead_run_are_ended(tmp_path):
    """A child's own child keeps running after the child exits (no death signal for it); the next run ends it."""
    from lorastrap.core import subproc
    record = tmp_path / "env.lorastrap-children"
    with subproc.recording_groups(record):
        res = subproc.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], timeout=10)
        left = record.read_text()  # what a run killed here would leave behind
    grandchild = int(res.stdout.strip())
    assert not record.exists() and alive(grandchild)
    record.write_text(left)
    assert subproc.kill_recorded_groups(record) == 1
    assert dies_within(grandchild, 5) and not record.exists()


def _unrelated():
    """A process lorastrap did not start, in a process group of its own (setsid), as any user's job is."""
    import subprocess
    proc = subprocess.Popen(["setsid", "sleep", "60"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.getpgid(proc.pid) != proc.pid:
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("record", [
    "{pid}\n",  # a bare group id, as an older record or a reboot leaves it
    '{{"token": "t", "host": "another-node", "boot_id": "{boot}"}}\n{{"pid": {pid}, "start": {start}}}\n',
    '{{"token": "t", "host": "{host}", "boot_id": "a-boot-before"}}\n{{"pid": {pid}, "start": {start}}}\n',
    '{{"token": "t", "host": "{host}", "boot_id": "{boot}"}}\n{{"pid": {pid}, "start": 1}}\n',  # the pid reused
])
def test_a_stale_or_foreign_children_record_kills_nothing_unrelated(tmp_path, record):
    import socket
    from lorastrap.core import subproc
    proc = _unrelated()
    try:
        path = tmp_path / "env.lorastrap-children"
        path.write_text(record.format(pid=proc.pid, host=socket.gethostname(), boot=subproc.boot_id(),
                                      start=subproc.start_time(proc.pid)))
        assert subproc.kill_recorded_groups(path) == 0
        assert proc.poll() is None and not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_children_carry_the_records_token_before_they_start_and_get_the_death_signal(tmp_path):
    """The record names the run before any child starts; a child's children inherit its token; a child started
    through setpriv or the exec shim dies with lorastrap, even by SIGKILL."""
    import json
    import subprocess
    from lorastrap.core import subproc
    record = tmp_path / "env.lorastrap-children"
    with subproc.recording_groups(record):
        head = json.loads(record.read_text().splitlines()[0])
        res = subproc.run(["sh", "-c", "echo $LORASTRAP_CHILD_OF"], timeout=10)
        assert head["token"] in res.stdout and head["boot_id"] == subproc.boot_id()
    for how in ("setpriv", "shim"):
        pid_file = tmp_path / f"{how}.pid"
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from lorastrap.core import subproc;"
                "subproc.run(['sh', '-c', 'echo $$ > ' + sys.argv[2] + '; exec sleep 60'], timeout=60)")
        parent = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "installer"), str(pid_file)],
                                  env={**os.environ, "LORASTRAP_DEATH_SIGNAL": how})
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()
        parent.wait()
        assert dies_within(child, 10), how



def test_an_engine_that_ran_out_of_disk_says_so():
    from lorastrap.install import engines
    from lorastrap.core.errors import DiskError
    with pytest.raises(DiskError) as info:  # py-rattler's words for ENOSPC, as its answer carries them
        engines._raise_if_disk_full("IOError: failed to link 'lib/x.so': No space left on device (os error 28)",
                                    Path("/p"))
    assert info.value.exit_code == 7 and "df -i" in info.value.fix
    engines._raise_if_disk_full("some other failure", Path("/p"))  # anything else: not a disk error


# --------------------------------------------------------------------------------------------------------------
# Reading an archive: a .conda's stored members straight from the file, any other through zipfile

def _conda(tmp_path) -> Path:
    import testchannel
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    return testchannel.hostile(tmp_path / "pkgs", "inner-link", outside)


def test_a_conda_archive_reads_the_same_stored_or_deflated_and_a_cut_one_is_unreadable(tmp_path):
    import zipfile
    from lorastrap.install import archive
    stored = _conda(tmp_path)
    with zipfile.ZipFile(stored) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())  # what conda writes
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    deflated = tmp_path / "deflated" / stored.name
    deflated.parent.mkdir()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    want = archive.inspect(stored)
    assert want["softlinks"] == {"lib64": "lib"} and "lib/ok.txt" in want["paths"]
    assert archive.inspect(deflated) == want
    # A directory that claims fewer bytes than the stored member holds (lying, or damaged): the member's
    # compressed stream ends early — an unreadable archive (exit 6), never a traceback.
    data = stored.read_bytes()
    with zipfile.ZipFile(stored) as z:
        last = max(z.infolist(), key=lambda i: i.header_offset)
    entry = data.rfind(b"PK\x01\x02")  # the last member's central directory entry; its compressed size at +20
    assert data[entry + 46:entry + 46 + len(last.filename)] == last.filename.encode()
    for claimed in (last.compress_size // 2, 1):
        cut = tmp_path / f"cut{claimed}" / stored.name
        cut.parent.mkdir()
        cut.write_bytes(data[:entry + 20] + claimed.to_bytes(4, "little") + data[entry + 24:])
        with pytest.raises(IntegrityError) as info:
            archive.inspect(cut)
        assert "cannot be read" in info.value.what
    # A local header that is not one where the directory says: unreadable too.
    bad = tmp_path / "bad" / stored.name
    bad.parent.mkdir()
    b = bytearray(data)
    b[last.header_offset:last.header_offset + 4] = b"XXXX"
    bad.write_bytes(bytes(b))
    with pytest.raises(IntegrityError):
        archive.inspect(bad)


def _with_pkg_tar(stored: Path, out: Path, tar: bytes) -> Path:
    """STORED with its pkg-*.tar.zst replaced by TAR (raw bytes, compressed)."""
    import zipfile
    import zstandard
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(stored) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
        for i in z.infolist():
            data = zstandard.ZstdCompressor().compress(tar) if i.filename.startswith("pkg-") else z.read(i)
            w.writestr(zipfile.ZipInfo(i.filename, date_time=i.date_time), data)
    return out


def _tar_header(name: str, size: int, kind: bytes = b"0") -> bytes:
    """A ustar header whose size field says SIZE (base-256 when octal cannot: any size a hostile tar may claim)."""
    b = bytearray(512)
    b[0:len(name)] = name.encode()
    b[100:124] = b"0000644\x000000000\x000000000\x00"
    b[124:136] = b"%011o\x00" % size if size < 8 ** 11 else bytes([0x80]) + size.to_bytes(11, "big")
    b[136:148] = b"00000000000\x00"
    b[156:157], b[257:265] = kind, b"ustar\x0000"
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\x00 " % sum(b)
    return bytes(b)


@pytest.mark.parametrize("name,kind", [("././@PaxHeader", b"x"), ("././@LongLink", b"L"), ("info/paths.json", b"0"),
                                       ("share/a.txt", b"0")])
@pytest.mark.parametrize("size", [2 ** 40, 2 ** 70])
def test_a_tar_header_that_claims_an_absurd_size_is_an_unreadable_archive(tmp_path, name, kind, size):
    # tarfile reads a pax/GNU header's data (and info/paths.json) in one read of the size the header names, and
    # seeks past a member by it: never an allocation of that size (MemoryError, OverflowError) or a traceback.
    from lorastrap.install import archive
    tar = _tar_header(name, size, kind) + b"{}" + bytes(510) + bytes(1024)
    bad = _with_pkg_tar(_conda(tmp_path), tmp_path / "bad" / "hostile-inner-link-1.0-h0_0.conda", tar)
    with pytest.raises(IntegrityError) as info:
        archive.inspect(bad)
    assert "cannot be read" in info.value.what


def test_an_info_paths_json_nested_past_the_recursion_limit_is_an_unreadable_archive(tmp_path):
    # json raises RecursionError (a RuntimeError) for "[[[[…": an archive that cannot be read (exit 6), never an
    # internal error.
    from lorastrap.install import archive
    body = b"[" * 200_000
    tar = _tar_header("info/paths.json", len(body)) + body + bytes(-len(body) % 512) + bytes(1024)
    bad = _with_pkg_tar(_conda(tmp_path), tmp_path / "bad" / "hostile-inner-link-1.0-h0_0.conda", tar)
    with pytest.raises(IntegrityError) as info:
        archive.inspect(bad)
    assert "cannot be read" in info.value.what


@pytest.mark.parametrize("field,value", [(8, 1), (10, 99)])  # the general-purpose flags: encrypted; the method: 99
@pytest.mark.parametrize("member", ["pkg-", "info-"])
def test_an_encrypted_member_or_an_unknown_compression_method_is_an_unreadable_archive(tmp_path, field, value, member):
    # zipfile raises RuntimeError / NotImplementedError for these, not BadZipFile: never a traceback.
    from lorastrap.install import archive
    stored = _conda(tmp_path)
    data = bytearray(stored.read_bytes())
    entry = data.find(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + len(member)] != member.encode():
        entry = data.find(b"PK\x01\x02", entry + 1)
    data[entry + field:entry + field + 2] = value.to_bytes(2, "little")
    bad = tmp_path / "bad" / stored.name
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        archive.inspect(bad)
    if member == "info-":
        with pytest.raises(IntegrityError):
            archive.paths_json(bad)


def test_the_flags_taken_from_how_an_environment_was_built_show_no_password(monkeypatch):
    import argparse
    from lorastrap.cli import remembered
    from lorastrap.core.records import BuiltWith
    monkeypatch.setattr(remembered, "built_with", lambda prefix: BuiltWith(
        envs_dir=None, channels=["https://ann:ch4nnel@conda.example/c"], mirror="https://ann:m1rror@m.example/c",
        pip_index_url="https://ann:p%40ss@pypi.example/simple", link_mode="hardlink", engine=None))
    args = argparse.Namespace(envs_dir=None, channel=None, mirror=None, pip_index_url=None, engine=None,
                              link_mode=None)
    said = []
    taken = remembered.apply(args, Path("/env"), narrate=said.append)
    assert args.pip_index_url == "https://ann:p%40ss@pypi.example/simple"  # still used with them
    assert said and taken
    for secret in ("ch4nnel", "m1rror", "p%40ss"):
        assert secret not in " ".join(said + taken)


def test_a_tar_bz2_member_that_claims_an_absurd_size_is_unreadable_at_once(tmp_path):
    """A .tar.bz2 whose member header claims 2**70 bytes (base-256, GNU format): tarfile's stream would skip it
    block by block for ever; it is an unreadable archive (exit 6), at once."""
    import bz2
    import io
    import tarfile
    from lorastrap.install import archive
    head = tarfile.TarInfo("lib/huge.bin")
    head.size = 2**70
    raw = io.BytesIO()
    raw.write(head.tobuf(tarfile.GNU_FORMAT))
    raw.write(b"\0" * 4096)
    path = tmp_path / "huge-1.0-h0_0.tar.bz2"
    path.write_bytes(bz2.compress(raw.getvalue()))
    t = time.monotonic()
    with pytest.raises(IntegrityError) as info:
        archive.inspect(path)
    assert "cannot be read" in info.value.what and time.monotonic() - t < 5


def test_a_folder_deeper_than_the_recursion_limit_is_removed_and_never_stops_an_install(tmp_path):
    """A half-unpacked folder 1,200 levels deep that a killed run left (shutil.rmtree recurses once a level on
    Python 3.11: RecursionError, whatever ignore_errors says): the sweep of orphans removes it, and raises
    nothing — it used to stop every later install with "internal error: RecursionError"."""
    from lorastrap.core import fsutil, paths
    cache = tmp_path / "extracted"
    left = cache / f".x-1.0-h0_0{paths.PARTIAL}{fsutil.hostname()}.999999999.d"  # no such process
    deep = left
    deep.mkdir(parents=True)
    for _ in range(1200):  # os.makedirs recurses too
        deep = deep / "a"
        deep.mkdir()
    (deep / "f").write_text("x")
    try:
        shutil.rmtree(left, ignore_errors=True)  # what the sweep met (Python 3.11: it removes nothing, then raises)
    except RecursionError:
        pass
    else:
        pytest.skip("this interpreter's shutil.rmtree removes a tree this deep by itself")
    assert fsutil.remove_orphans(cache, paths.PARTIAL, marked=True) == [left]
    assert not left.exists()


def test_a_damaged_member_of_another_compression_is_an_unreadable_archive(tmp_path):
    """A .conda whose members are LZMA- or deflate-compressed (zipfile reads them; conda writes them stored) and
    damaged: an IntegrityError that says the archive cannot be read — zipfile's decompressors raise lzma.LZMAError
    and zlib.error, neither an OSError — not an internal error."""
    import zipfile
    from lorastrap.core.errors import IntegrityError
    from lorastrap.install import archive
    stored = _conda(tmp_path)
    with zipfile.ZipFile(stored) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    for method in (zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED):
        damaged = tmp_path / str(method) / stored.name
        damaged.parent.mkdir()
        with zipfile.ZipFile(damaged, "w", compression=method) as z:
            for name, data in members:
                z.writestr(name, data)
        data = bytearray(damaged.read_bytes())
        with zipfile.ZipFile(damaged) as z:
            info = next(i for i in z.infolist() if i.filename.startswith("info-"))
        at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 20
        data[at:at + 64] = bytes(64)
        damaged.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="cannot be read"):
            archive.inspect(damaged)


def _transmuted(tmp_path) -> tuple[Path, Path, Path]:
    """One package as lorastrap's test channel writes it, and as the real micromamba rewrites it (`package
    transmute`): a .tar.bz2, then a .conda again (libarchive's: its members' sizes after their data)."""
    ours = _conda(tmp_path)
    work = tmp_path / "mm"
    work.mkdir()
    shutil.copy(ours, work / ours.name)
    subprocess.run([str(MAMBA), "package", "transmute", ours.name], cwd=work, check=True, capture_output=True)
    bz2 = next(work.glob("*.tar.bz2"))
    (work / "again").mkdir()
    bz2 = Path(shutil.move(bz2, work / "again" / bz2.name))
    subprocess.run([str(MAMBA), "package", "transmute", bz2.name], cwd=bz2.parent, check=True, capture_output=True)
    return ours, bz2, next(bz2.parent.glob("*.conda"))


@pytest.mark.skipif(MAMBA is None, reason="no micromamba")
def test_archives_another_writer_made_read_the_same(tmp_path):
    """The same package rewritten by the real micromamba (`package transmute`: libarchive writes its .conda with
    data descriptors, and a .tar.bz2): the containment check reads the same paths, links and sizes from all three."""
    from lorastrap.install import archive
    ours, bz2, libarchives = _transmuted(tmp_path)
    import zipfile
    with zipfile.ZipFile(libarchives) as z:
        assert any(i.flag_bits & 0x8 for i in z.infolist())  # sizes after the data: another writer's layout
    want = archive.inspect(ours)
    for p in (bz2, libarchives):
        got = archive.inspect(p)
        assert (got["paths"], got["softlinks"], got["unpacked_bytes"]) == \
            (want["paths"], want["softlinks"], want["unpacked_bytes"]), p.name


@pytest.mark.skipif(MAMBA is None, reason="no micromamba")
def test_own_unpacking_of_archives_another_writer_made_is_rattlers(tmp_path):
    """lorastrap's own unpacker (big archives) on the .conda the real micromamba writes (`package transmute` twice,
    libarchive: its members' sizes after their data, which py-rattler 0.28's streaming extract refuses: "The file
    length is not available in the local header"): unpacked as py-rattler's extract unpacks the package's original
    .conda.  A .tar.bz2 it leaves to the engine, with a clear refusal."""
    from conftest import rattler_extract, unpacked_tree
    from lorastrap.core.errors import IntegrityError
    from lorastrap.install import archive
    ours, bz2, libarchives = _transmuted(tmp_path)
    rattler_extract({tmp_path / "theirs": ours})
    archive.unpack(libarchives, tmp_path / "ours", unchanged=lambda st: True)
    mine = unpacked_tree(tmp_path / "ours")
    assert mine == unpacked_tree(tmp_path / "theirs") and "lib/ok.txt" in mine
    with pytest.raises(IntegrityError, match="unpacks .conda archives only"):
        archive.unpack(bz2, tmp_path / "bz2", unchanged=lambda st: True)


def test_pip_records_read_with_csv_are_what_importlib_metadata_reads():
    """damage_manifest reads each dist-info's RECORD with csv alone (prefix._recorded); importlib.metadata, which it
    replaced, is the oracle — on this runtime's own site-packages, written by pip and uv, not by lorastrap."""
    import sysconfig
    from importlib import metadata

    from lorastrap.install import prefix as pfx
    sp = Path(sysconfig.get_path("purelib"))
    ours = {(os.path.normpath(sp / rel), size) for _, _, rows in pfx._recorded(sp) for rel, size in rows}
    oracle = {(os.path.normpath(sp / str(f)), f.size) for d in metadata.distributions(path=[str(sp)])
              if str(getattr(d, "_path", "")).endswith(".dist-info") for f in d.files or [] if f.size is not None}
    assert len(oracle) > 1000 and ours == oracle
    installers = {project: how for project, how, _ in pfx._recorded(sp)}
    assert installers["pytest"] in ("pip", "uv")


def test_the_pip_entries_check_looks_at_the_dist_info_folder_then_asks_importlib_metadata(tmp_path):
    """mismatches: a pip entry whose {name}-{version}.dist-info folder (PEP 503 name, - as _) is there passes
    without importlib.metadata; any other layout (an older installer's folder name) is decided by it."""
    from types import SimpleNamespace

    from lorastrap.install import prefix as pfx
    sp = tmp_path / "lib" / "python3.11" / "site-packages"
    entry = SimpleNamespace(manager="pip", name="Foo.Bar", version="1.0", sha256="0" * 64)

    def dist(folder, version="1.0"):
        (sp / folder).mkdir(parents=True)
        (sp / folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: Foo.Bar\nVersion: {version}\n")

    assert pfx.mismatches(tmp_path, [entry]) == ["Foo.Bar (pip): not installed at 1.0"]
    dist("foo_bar-1.0.dist-info")
    assert pfx._dist_info_present(sp, "Foo.Bar", "1.0") and pfx.mismatches(tmp_path, [entry]) == []
    shutil.rmtree(sp / "foo_bar-1.0.dist-info")
    dist("Foo.Bar-1.0.dist-info")  # not the normalized name: the quick look misses, importlib.metadata finds it
    assert not pfx._dist_info_present(sp, "Foo.Bar", "1.0") and pfx.mismatches(tmp_path, [entry]) == []
    shutil.rmtree(sp / "Foo.Bar-1.0.dist-info")
    dist("foo_bar-0.9.dist-info", "0.9")
    assert pfx.mismatches(tmp_path, [entry]) == ["Foo.Bar (pip): not installed at 1.0"]


def test_plain_records_behave_as_the_dataclasses_they_replace():
    """core/plain.py's record and frozen_record write __init__, __repr__, __eq__ and __hash__ once, in Plain, not per
    class as dataclass does (a start-up cost): the same classes made with Python's own dataclass are the oracle."""
    import copy
    import dataclasses

    from lorastrap.core import plain

    def both(frozen: bool):
        made = []
        for deco in ((plain.frozen_record if frozen else plain.record),
                     dataclasses.dataclass(kw_only=True, frozen=frozen)):
            class Inner(plain.Plain):
                x: int = 0
            Inner = deco(Inner)

            class Rec(plain.Plain):
                name: str
                tags: list = plain.Field(default_factory=list)
                inner: Inner | None = None
                size: int = plain.Field(7, description="a described default")
                hidden: int = dataclasses.field(default=0, repr=False, compare=False)
            Rec.__annotations__["inner"] = Inner | None  # resolved here: the class is local
            made.append((deco(Rec), Inner))
        return made

    for frozen in (False, True):
        (ours, our_inner), (theirs, their_inner) = both(frozen)
        for kw in ({"name": "a"}, {"name": "a", "tags": [1], "size": 3, "hidden": 9},
                   {"name": "b", "inner": {"x": 2}}):
            a, b = ours(**kw), theirs(**kw)
            assert repr(a).replace("Rec(", "").replace("Inner(", "") == \
                repr(b).replace("Rec(", "").replace("Inner(", "")
            assert a.model_dump() == b.model_dump() == dataclasses.asdict(a)
            assert a == ours(**kw) and (a != ours(**{**kw, "name": "z"}))
            assert a == ours(**{**kw, "hidden": 123})  # compare=False, as the dataclass has it
            assert (a == b) is False  # another class: never equal (NotImplemented both ways)
            assert copy.copy(a) == a and copy.deepcopy(a) == a and copy.deepcopy(a) is not a
            assert dataclasses.replace(a, size=1).size == 1 and dataclasses.replace(a, size=1).name == a.name
        assert ours(name="a").tags is not ours(name="a").tags  # each its own default list
        for make in (ours, theirs):
            with pytest.raises(TypeError):
                make("a")  # keyword arguments only
        with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
            ours(name="a", nope=1)
        with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'name'"):
            ours(tags=[])
        a = ours(name="a", tags=(), inner=our_inner(x=1))
        if frozen:
            assert hash(a) == hash(ours(name="a", tags=(), inner=our_inner(x=1), hidden=5))  # by the compared values
            assert hash(ours(name="a", tags=(1,))) == hash(theirs(name="a", tags=(1,)))  # the same tuple hashed
            for make in (ours, theirs):
                with pytest.raises(TypeError):
                    hash(make(name="a", tags=[1]))  # a list inside: unhashable, as the dataclass's
            with pytest.raises(dataclasses.FrozenInstanceError):
                a.name = "b"
            with pytest.raises(dataclasses.FrozenInstanceError):
                del a.name
            with pytest.raises(dataclasses.FrozenInstanceError):
                theirs(name="a").name = "b"
        else:
            a.name = "b"
            assert a.name == "b"
            with pytest.raises(TypeError):
                hash(a)  # unhashable, as a dataclass with eq and without frozen
            with pytest.raises(TypeError):
                hash(theirs(name="a"))
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


def test_plain_records_keep_what_dataclass_does_with_the_rarer_fields():
    """Fields out of __init__ or out of the hash, a record holding itself, inheritance between frozen and not: as
    dataclass has them (the oracle); what a plain record cannot do (an InitVar) is refused when the class is made."""
    import dataclasses

    from lorastrap.core import plain

    for frozen, deco in ((False, plain.record), (True, plain.frozen_record)):
        made = []
        for d in (deco, dataclasses.dataclass(kw_only=True, frozen=frozen)):
            class A(plain.Plain):
                x: int = 0
                seen: list = dataclasses.field(init=False, default_factory=list, hash=False)
                tag: str = dataclasses.field(init=False, default="t")
                loose: tuple = dataclasses.field(default=(), hash=False)
                counted: int = dataclasses.field(default=5, compare=False, hash=True)
            made.append(d(A))
        ours, theirs = made
        a, b = ours(x=1, loose=(1,)), theirs(x=1, loose=(1,))
        assert (a.seen, a.tag) == (b.seen, b.tag) == ([], "t") and a.seen is not ours(x=1).seen
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
        if frozen:
            assert hash(a) == hash(b) == hash((1, "t", 5))  # x, tag, counted: seen and loose compared, not hashed
            assert hash(ours(x=1, loose=([],))) == hash(a)  # a list where the hash does not look
    with pytest.raises(TypeError, match="frozen"):
        @plain.record
        class Child(ours):  # ours is frozen here: dataclass refuses the same
            c: int = 0

    @plain.record
    class Loop(plain.Plain):
        x: object = None
    loop = Loop()
    loop.x = loop
    assert repr(loop).endswith("Loop(x=...)")
    with pytest.raises(TypeError, match="InitVar"):
        @plain.record
        class WithInitVar(plain.Plain):
            z: dataclasses.InitVar[int] = 0
    with pytest.raises(TypeError, match="__eq__"):
        @plain.record
        class OwnEq(plain.Plain):
            def __eq__(self, other):
                return True


def test_own_python_children_skip_site_yet_import_what_this_process_imports(tmp_path):
    """lorastrap's own Python children (the engine's worker, the probes) start with -S: no site module and no .pth
    files read (~5 ms of each start), the folders this process's site added handed over on PYTHONPATH — so the
    child still imports lorastrap and py-rattler's compiled module from wherever this process found them."""
    import subprocess
    import sys

    from lorastrap.core import subproc
    argv, env = subproc.own_python("locking.rattler_worker", "--an-argument")
    assert argv == [sys.executable, "-S", "-m", "lorastrap.locking.rattler_worker", "--an-argument"]
    import os
    assert os.path.dirname(os.__file__) not in env["PYTHONPATH"].split(os.pathsep)  # the interpreter's own
    code = ("import sys, lorastrap.locking.rattler_worker, rattler.rattler as r; "
            "print('site' in sys.modules, r.__file__, lorastrap.locking.rattler_worker.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    import lorastrap.locking.rattler_worker
    import rattler.rattler
    assert out == ["False", rattler.rattler.__file__, lorastrap.locking.rattler_worker.__file__]
    assert subprocess.run([sys.executable, "-S", "-c", "import lorastrap"], cwd=tmp_path, capture_output=True,
                          env={k: v for k, v in env.items() if k != "PYTHONPATH"}).returncode != 0  # what it needs
    # Found through an entry that is also the current folder, under PYTHONSAFEPATH (which the child inherits: -m
    # then adds no current folder); and from a current folder that was removed (os.getcwd() fails there).
    installer = Path(lorastrap.locking.rattler_worker.__file__).parents[2]
    parent = ("import os, sys; from lorastrap.core import subproc; "
              "r = subproc.python_module('machine.nvml_probe', timeout=60); print(r.returncode, r.stderr[-300:])")
    site_dirs = [d for d in sys.path if d.endswith("site-packages")]
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    path = os.pathsep.join([str(installer), *site_dirs])
    safe = subprocess.run([sys.executable, "-c", parent], cwd=installer, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONSAFEPATH": "1", "PYTHONPATH": path})
    assert safe.returncode == 0 and safe.stdout.startswith("0 "), (safe.stdout, safe.stderr[-2000:])
    gone = tmp_path / "gone"
    gone.mkdir()
    removed = subprocess.run(["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" -c "$1"', sys.executable,
                              parent], capture_output=True, text=True, timeout=120, env={**base, "PYTHONPATH": path})
    assert removed.returncode == 0 and removed.stdout.startswith("0 "), (removed.stdout, removed.stderr[-2000:])


def test_plain_structs_behave_as_the_dataclasses_they_replace():
    """core/plain.py's struct and frozen_struct (the dataclasses kept in memory only: an engine, a lock's entry)
    share one __init__ that takes positional arguments too, in field order: Python's own dataclass of the same
    class is the oracle, call for call, errors included."""
    import copy
    import dataclasses

    from lorastrap.core import plain

    for frozen in (False, True):
        made = []
        for deco in ((plain.frozen_struct if frozen else plain.struct), dataclasses.dataclass(frozen=frozen)):
            class S(plain.Struct):
                name: str
                size: int
                tags: tuple = ()
                extra: list = dataclasses.field(default_factory=list, compare=False)
                late: str = dataclasses.field(default="k", kw_only=True)

                @property
                def label(self) -> str:
                    return f"{self.name}:{self.size}"
            made.append(deco(S))
        ours, theirs = made
        calls = [(("a", 1), {}), (("a",), {"size": 2}), ((), {"name": "a", "size": 3, "tags": (1,)}),
                 (("a", 1, (2,), [3]), {"late": "z"})]
        for args, kw in calls:
            a, b = ours(*args, **kw), theirs(*args, **kw)
            assert repr(a) == repr(b) and dataclasses.asdict(a) == dataclasses.asdict(b) and a.label == b.label
            assert a == ours(*args, **kw) and (a == b) is False
            assert copy.deepcopy(a) == a and dataclasses.replace(a, size=9).size == 9
            if frozen:
                assert hash(a) == hash(b)
                with pytest.raises(dataclasses.FrozenInstanceError):
                    a.size = 2
            else:
                with pytest.raises(TypeError):
                    hash(a)
        assert ours("a", 1).extra is not ours("a", 1).extra
        assert ours("a", 1, (), [1]) == ours("a", 1, (), [2])  # extra: compare=False
        for args, kw in [((), {}), (("a",), {}), (("a", 1, (), [], "x"), {}), (("a", 1), {"name": "b"}),
                         (("a", 1), {"nope": 1})]:
            with pytest.raises(TypeError) as mine:
                ours(*args, **kw)
            with pytest.raises(TypeError) as real:
                theirs(*args, **kw)
            assert str(mine.value).split("() ", 1)[1] == str(real.value).split("() ", 1)[1]
        assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        @plain.struct
        class Bad(plain.Struct):
            a: int = 0
            b: int
    with pytest.raises(TypeError, match="must subclass Struct"):
        @plain.struct
        class NotOne:
            a: int = 0


def test_the_yaml_reader_reads_as_the_pure_loader_and_says_what_character_stopped_it():
    # libyaml's loader when there is one; on a syntax error the pure loader's message, which names the character
    # (libyaml's alone: "found character that cannot start any token").  The text is the start of conda-forge's
    # pytorch-cpu-feedstock recipe/meta.yaml (Jinja, not YAML), as a file someone might hand over.
    import yaml
    from lorastrap.core import yamlio
    doc = "a: 1\nb: [x, 'y', 2.5, null, yes]\nc: {d: e}\n"
    assert yamlio.load(doc) == yaml.load(doc, Loader=yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError) as info:
        yamlio.load('# if you wish to build release candidate number X, append the version string with "-rcX"\n'
                    '{% set version = "2.13.0" %}\n{% set build = 2 %}\n')
    assert "'%'" in str(info.value.problem) and info.value.problem_mark.line == 1
