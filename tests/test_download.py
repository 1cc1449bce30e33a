"""Downloads against a real loopback server that misbehaves on demand (scripts/netsim.py): retry, Range resume,
a stall that is narrated and bounded, tampering only for a complete download, parallel pooled connections, large
files in segments over several connections (resumed across runs from their sidecar)."""

import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from netsim import NetSim

from lorastrap.install import cache, download
from lorastrap.core.errors import IntegrityError, NetworkError
from lorastrap.core import credentials

SIZE = 3 * 2**20 + 123  # more than one read block, so a cut lands mid-body


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "big.conda").write_bytes(data)
    srv = NetSim(root).start()
    yield srv, root, cache.sha256_file(root / "big.conda")
    srv.shutdown()


@pytest.fixture
def one_connection(monkeypatch):
    """The contiguous path: each file over one connection, no segments (what a proxied download gets)."""
    monkeypatch.setattr(download, "SEGMENTS", 1)


def _fetch(tmp_path, srv, sha, narrated=None):
    c = cache.Cache(tmp_path / "pkgs")
    return c, c.fetch(f"{srv.url}/big.conda", sha, "big.conda",
                      narrate=(narrated.append if narrated is not None else lambda m: None))


def test_a_cut_download_is_resumed_with_range(tmp_path, served, one_connection):
    srv, root, sha = served
    srv.inject("big.conda", "cut", "cut")
    narrated = []
    c, (path, got) = _fetch(tmp_path, srv, sha, narrated)
    assert cache.sha256_file(path) == sha
    assert srv.requests["big.conda"] == 3 and srv.range_requests["big.conda"] == 2
    assert got < 1.5 * SIZE  # resumed, not downloaded three times
    assert any("retrying (1/" in m for m in narrated) and any("resuming at" in m for m in narrated)
    assert not list(c.root.rglob("*.part"))


def test_a_cut_that_never_heals_is_a_network_error_and_the_part_is_kept_for_the_next_run(tmp_path, served,
                                                                                            monkeypatch,
                                                                                            one_connection):
    srv, root, sha = served
    monkeypatch.setattr(download, "RETRIES", 2)
    srv.inject("big.conda", "cut", "cut")
    with pytest.raises(NetworkError) as info:
        _fetch(tmp_path, srv, sha)
    assert "closed after" in info.value.why and "resume" in info.value.fix
    parts = list((tmp_path / "pkgs").rglob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < SIZE
    _, (path, got) = _fetch(tmp_path, srv, sha)  # the next run resumes the kept part
    assert cache.sha256_file(path) == sha and got < SIZE and srv.range_requests["big.conda"] >= 2


def _served_as(path: Path, data: bytes, minutes: int) -> None:
    """What the server has under PATH's name from now on, MINUTES newer (a mirror syncing)."""
    path.write_bytes(data)
    later = time.time() + 60 * minutes
    os.utime(path, (later, later))


def test_a_kept_part_is_resumed_only_while_the_server_has_the_same_file(tmp_path, served, monkeypatch,
                                                                         one_connection):
    """RFC 9110 13.1.5: the next run asks for the rest with If-Range (the ETag of the file the part is of).  The
    same file: the rest comes (206).  A file changed on the server meanwhile — the first run got part of a file a
    mirror was still syncing, the mirror now has the right one — comes whole in that one answer (200), instead
    of the rest of another file, a checksum mismatch and a second download."""
    srv, root, sha = served
    monkeypatch.setattr(download, "RETRIES", 2)
    good = (root / "big.conda").read_bytes()
    for run in ("same", "changed"):
        pkgs = tmp_path / run
        if run == "changed":
            _served_as(root / "big.conda", os.urandom(SIZE), minutes=1)  # not yet the file the lock names
        srv.inject("big.conda", "cut", "cut")
        with pytest.raises(NetworkError):
            _fetch(pkgs, srv, sha)
        part = next((pkgs / "pkgs").rglob(".big.conda.part"))
        kept = part.stat().st_size
        assert 0 < kept < SIZE and json.loads(download.sidecar(part).read_text())["validator"].startswith('"')
        if run == "changed":
            _served_as(root / "big.conda", good, minutes=2)  # synced: the lock's file
        narrated: list[str] = []
        _, (path, got) = _fetch(pkgs, srv, sha, narrated)
        assert cache.sha256_file(path) == sha and not _leftovers(pkgs / "pkgs")
        if run == "same":
            assert srv.if_range["big.conda"] == [True] and got == SIZE - kept
            assert any("resuming at" in m for m in narrated), narrated
        else:
            assert srv.if_range["big.conda"] == [True, False] and got == SIZE, got  # one whole download
            assert any("changed on the server" in m for m in narrated), narrated
            assert not any("does not match" in m for m in narrated), narrated


def test_server_errors_are_retried_and_a_404_is_not(tmp_path, served, monkeypatch, one_connection):
    srv, root, sha = served
    srv.inject("big.conda", "500", "500")
    _, (path, _) = _fetch(tmp_path, srv, sha)
    assert srv.requests["big.conda"] == 3
    (root / "gone.conda").write_bytes(b"x")
    srv.inject("gone.conda", "404")
    c = cache.Cache(tmp_path / "pkgs2")
    with pytest.raises(NetworkError) as info:
        c.fetch(f"{srv.url}/gone.conda", "0" * 64, "gone.conda")
    assert "HTTP 404" in info.value.why and srv.requests["gone.conda"] == 1
    monkeypatch.setattr(download, "RETRIES", 3)
    srv.inject("gone.conda", "500", "500", "500")
    with pytest.raises(NetworkError) as info:
        c.fetch(f"{srv.url}/gone.conda", "0" * 64, "gone.conda")
    assert "HTTP 500" in info.value.why and srv.requests["gone.conda"] == 4


def test_a_stall_is_narrated_bounded_and_resumed(tmp_path, served, monkeypatch, one_connection):
    srv, root, sha = served
    srv.stall_s = 3
    monkeypatch.setenv("LORASTRAP_READ_TIMEOUT", "0.3")
    srv.inject("big.conda", "stall")
    narrated = []
    t = time.monotonic()
    _, (path, _) = _fetch(tmp_path, srv, sha, narrated)
    assert time.monotonic() - t < 2.5 and cache.sha256_file(path) == sha
    assert any("no data from 127.0.0.1" in m and "retrying" in m for m in narrated), narrated
    monkeypatch.setattr(download, "RETRIES", 2)
    srv.inject("big.conda", "stall", "stall")
    c = cache.Cache(tmp_path / "pkgs2")
    t = time.monotonic()
    with pytest.raises(NetworkError) as info:
        c.fetch(f"{srv.url}/big.conda", sha, "big.conda")
    assert "no data" in info.value.why and time.monotonic() - t < 2.5


def test_only_a_complete_download_that_differs_is_tampering(tmp_path, served):
    srv, root, sha = served
    srv.inject("big.conda", "lie")
    with pytest.raises(IntegrityError) as info:
        _fetch(tmp_path, srv, sha)
    assert info.value.exit_code == 6 and "downloaded completely" in info.value.why
    assert not list((tmp_path / "pkgs").rglob("*.part"))


def test_a_resumed_part_of_another_file_is_downloaded_again(tmp_path, served):
    srv, root, sha = served
    c = cache.Cache(tmp_path / "pkgs")
    part = c.entry(sha, "big.conda").with_name(".big.conda.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"not the start of this file" * 100)
    narrated = []
    path, _ = c.fetch(f"{srv.url}/big.conda", sha, "big.conda", narrate=narrated.append)
    assert cache.sha256_file(path) == sha and any("again from the start" in m for m in narrated)


def test_parallel_downloads_over_pooled_connections(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    items = []
    for i in range(24):
        (root / f"p{i}.conda").write_bytes(os.urandom(20_000 + i))
    srv = NetSim(root, delay_s=0.05).start()
    try:
        items = [(f"{srv.url}/p{i}.conda", cache.sha256_file(root / f"p{i}.conda"), f"p{i}.conda")
                 for i in range(24)]
        t = time.monotonic()
        results = cache.Cache(tmp_path / "pkgs").fetch_all(items, jobs=8)
        took = time.monotonic() - t
        parallel_open, connections, requests = srv.max_open, srv.connections, sum(srv.requests.values())
        t = time.monotonic()
        cache.Cache(tmp_path / "pkgs-one-at-a-time").fetch_all(items, jobs=1)  # the baseline, same server and run
        one_at_a_time = time.monotonic() - t
    finally:
        srv.shutdown()
    assert [p.name for p, _ in results] == [fn for _, _, fn in items]
    assert took < one_at_a_time / 2, (took, one_at_a_time)  # 24 x 50 ms of latency, overlapped
    assert parallel_open >= 4
    assert connections <= 8 < requests  # kept alive: fewer connections than requests


def test_the_first_failure_stops_the_others(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    for i in range(6):
        (root / f"p{i}.conda").write_bytes(os.urandom(200_000))
    srv = NetSim(root, rate=400_000).start()  # each takes ~0.5 s
    try:
        srv.inject("p0.conda", "404")
        items = [(f"{srv.url}/p{i}.conda", cache.sha256_file(root / f"p{i}.conda"), f"p{i}.conda") for i in range(6)]
        t = time.monotonic()
        with pytest.raises(NetworkError):
            cache.Cache(tmp_path / "pkgs").fetch_all(items, jobs=3)
        assert time.monotonic() - t < 1.0
    finally:
        srv.shutdown()


@pytest.mark.parametrize("segments", [1, 8])
def test_a_failure_or_an_interrupt_does_not_wait_for_a_silent_server(tmp_path, monkeypatch, segments):
    """One archive's server goes silent mid-body (a stall longer than the test); another archive's 404 — or a
    Ctrl-C — stops the run at once: the stalled read is ended by shutting its connection down, not waited for until
    the read timeout (30 s)."""
    import signal
    monkeypatch.setattr(download, "SEGMENTS", segments)
    root = tmp_path / "srv"
    root.mkdir()
    for name in ("slow.conda", "gone.conda"):
        (root / name).write_bytes(os.urandom(3 * 2**20))
    srv = NetSim(root, stall_s=25).start()
    late = NetSim(root, delay_s=1.0).start()  # its answers come a second late: the stall is under way by then
    items = [(f"{srv.url}/slow.conda", cache.sha256_file(root / "slow.conda"), "slow.conda"),
             (f"{late.url}/gone.conda", cache.sha256_file(root / "gone.conda"), "gone.conda")]
    try:
        srv.inject("slow.conda", *["stall"] * 9)  # every request for it stalls halfway
        late.inject("gone.conda", *["404"] * 9)
        t = time.monotonic()
        with pytest.raises(NetworkError) as info:
            cache.Cache(tmp_path / "a").fetch_all(items, jobs=2)
        assert "404" in info.value.why and time.monotonic() - t < 5, time.monotonic() - t
        # Ctrl-C while the only download waits on the silent server
        srv.inject("slow.conda", *["stall"] * 9)
        timer = threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
        t = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            cache.Cache(tmp_path / "b").fetch_all(items[:1], jobs=1)
        assert time.monotonic() - t < 5, time.monotonic() - t
    finally:
        srv.shutdown()
        late.shutdown()


def test_progress_ends_its_line(capsys):
    p = download.Progress(2)
    p.tty = True
    p.add(2**20)
    p.done_one()
    p.done_one()
    p.close()
    err = capsys.readouterr().err
    assert err.startswith("\r  downloading:") and "2/2 files" in err and err.endswith("\n")


# --- the same faults through `lorastrap install` ----------------------------------------------------------------

TEST_ENVS = ROOT / "tests" / "envs"
CUDA = {"CONDA_OVERRIDE_CUDA": "12.4"}


def _install(channel, prefix, *args, env=None):
    return run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                   channel["simple"], "--prefix", str(prefix), "--no-verify", *args, env=env)


def _uncache(home, pattern):
    """Drop the cached archives matching pattern (this test's own data dir; the archives are hard links)."""
    gone = [p for p in (home / "pkgs" / "archives").glob(f"*/{pattern}")]
    for p in gone:
        shutil.rmtree(p.parent)
    assert gone
    return [p.name for p in gone]


def _untouched(prefix, before):
    assert sorted(p.name for p in (prefix / "conda-meta").glob("*.json")) == before
    assert not Path(str(prefix) + ".lorastrap-backup").exists()
    assert not Path(str(prefix) + ".lorastrap-txn.json").exists()


@pytest.fixture
def mirror(channel):
    srv = NetSim(channel["root"]).start()
    yield srv
    srv.shutdown()


def test_install_through_cuts_resumes_and_a_cut_that_never_heals_is_a_network_error(channel, warm_home, tmp_path,
                                                                                   mirror):
    prefix = tmp_path / "env"
    assert _install(channel, prefix).returncode == 0
    before = sorted(p.name for p in (prefix / "conda-meta").glob("*.json"))
    names = _uncache(warm_home, "pytorch-*cuda*.conda")
    mirror.inject(names[0], *["cut"] * 40)  # every request (the archive comes in segments, each with 5 attempts)
    res = _install(channel, prefix, "--mirror", f"{mirror.url}/channel", env=CUDA)
    mirror.faults[names[0]].clear()
    assert res.returncode == 5, res.stderr
    assert "could not download" in res.stderr and "closed after" in res.stderr and "checksum" not in res.stderr
    assert "retrying (4/4)" in res.stderr and "Traceback" not in res.stderr
    _untouched(prefix, before)  # refused before anything changed
    mirror.inject(names[0], "cut", "cut")
    res = _install(channel, prefix, "--mirror", f"{mirror.url}/channel", env=CUDA)
    assert res.returncode == 0, res.stderr
    assert "resuming at" in res.stderr and mirror.range_requests[names[0]] >= 2


def test_lying_repodata_is_tampering(channel, home, tmp_path):
    """A mirror whose repodata.json names a sha256 its archive does not have: locked from it, the complete
    download differs, exit 6, nothing installed."""
    lying = tmp_path / "lying"
    shutil.copytree(channel["root"], lying, copy_function=os.link)
    repodata = lying / "channel" / "linux-64" / "repodata.json"
    data = json.loads(repodata.read_text())
    victim = next(fn for fn in data["packages.conda"] if fn.startswith("numpy-"))
    data["packages.conda"][victim]["sha256"] = "0" * 64
    repodata.unlink()  # a hard link: write a new file, not the shared one
    repodata.write_text(json.dumps(data))
    srv = NetSim(lying).start()
    try:
        res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", f"{srv.url}/channel", "--pip-index-url",
                      f"{srv.url}/simple", "--prefix", str(tmp_path / "env"), "--no-verify")
    finally:
        srv.shutdown()
    assert res.returncode == 6, res.stderr
    assert victim in res.stderr and "downloaded completely" in res.stderr and "want sha256 " + "0" * 64 in res.stderr
    assert not (tmp_path / "env").exists()


def test_pip_wheels_are_fetched_and_checked_before_anything_changes_and_follow_the_index(channel, warm_home,
                                                                                          tmp_path):
    prefix = tmp_path / "env"
    assert _install(channel, prefix).returncode == 0
    before = sorted(p.name for p in (prefix / "conda-meta").glob("*.json"))
    wheel = _uncache(warm_home, "*.whl")[0]
    record = prefix / "conda-meta" / "lorastrap" / "record.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "lock_digest": "0"}))  # force a rebuild
    empty = tmp_path / "empty-index"
    (empty / "simple").mkdir(parents=True)
    down = NetSim(empty).start()
    try:  # a PyPI mirror that lacks the wheel: refused at the fetch step, the environment untouched
        res = _install(channel, prefix, "--pip-index-url", f"{down.url}/simple")
    finally:
        down.shutdown()
    assert res.returncode == 5, res.stderr
    assert "pip index" in res.stderr and "Traceback" not in res.stderr
    _untouched(prefix, before)
    other = NetSim(channel["root"]).start()  # another index with the same files: the wheel comes from there
    try:
        res = _install(channel, prefix, "--pip-index-url", f"{other.url}/simple")
    finally:
        other.shutdown()
    assert res.returncode == 0, res.stderr
    assert other.requests[wheel] == 1 and other.requests["index.html"] >= 1
    assert list((prefix / "lib").glob("python3*/site-packages/lorastrap_testwheel/__init__.py"))


def test_a_redirect_only_to_the_same_host_or_a_named_one(tmp_path, served):
    srv, root, sha = served
    port = srv.url.rsplit(":", 1)[1]
    srv.inject("big.conda", f"redirect:http://localhost:{port}/big.conda")  # another host name for the same server
    with pytest.raises(NetworkError) as info:
        _fetch(tmp_path, srv, sha)
    assert "another host (localhost)" in info.value.why and "LORASTRAP_REDIRECT_HOSTS" in info.value.fix
    assert srv.requests["big.conda"] == 1 and not list((tmp_path / "pkgs").rglob("*.part"))
    srv.inject("big.conda", f"redirect:http://127.0.0.1:{port}/big.conda")  # the same host: followed
    _, (path, _) = _fetch(tmp_path, srv, sha)
    assert cache.sha256_file(path) == sha
    (tmp_path / "pkgs").rename(tmp_path / "pkgs-1")
    srv.inject("big.conda", f"redirect:http://localhost:{port}/big.conda")
    c = cache.Cache(tmp_path / "pkgs", redirect_hosts=cache.redirect_hosts_from(["http://localhost:1/channel"]))
    path, _ = c.fetch(f"{srv.url}/big.conda", sha, "big.conda")  # a host the user named: followed
    assert cache.sha256_file(path) == sha


@pytest.mark.parametrize("part", ["complete", "longer"])
def test_a_complete_or_longer_part_never_wedges_the_archive(tmp_path, served, part):
    """A run killed after the last byte leaves a complete .part: it is checked by its hash, not resumed (a Range
    request past the end is answered 416); a longer part (another file) is downloaded again from the start."""
    srv, root, sha = served
    c = cache.Cache(tmp_path / "pkgs")
    tmp = c.entry(sha, "big.conda").with_name(".big.conda.part")
    tmp.parent.mkdir(parents=True)
    data = (root / "big.conda").read_bytes()
    tmp.write_bytes(data if part == "complete" else data + b"more bytes than the file has")
    narrated = []
    path, got = c.fetch(f"{srv.url}/big.conda", sha, "big.conda", narrate=narrated.append)
    assert cache.sha256_file(path) == sha and not tmp.exists()
    if part == "complete":
        assert got == 0 and srv.requests.get("big.conda", 0) == 0
    else:
        assert any("from the start" in m for m in narrated) and got == SIZE


def test_a_mirror_per_channel(channel, warm_home, tmp_path, mirror):
    """A committed lock of two channels: one bare --mirror is refused (it would stand for both); --mirror
    CHANNEL=URL rewrites only its channel."""
    import yaml
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    doc = yaml.safe_load((warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml").read_text())
    doc["metadata"]["channels"].append({"url": "https://conda.anaconda.org/nvidia", "used_env_vars": []})
    (envs / "test-cpu.conda-lock.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    prefix = tmp_path / "env"

    def install(*args):
        return run_cli("install", "--envs-dir", str(envs), "--pip-index-url", channel["simple"], "--prefix",
                       str(prefix), "--no-verify", "--profile", "test-cpu", *args)

    res = install("--mirror", f"{mirror.url}/channel")
    assert res.returncode == 2 and "the lock uses 2 channels" in res.stderr and "--mirror CHANNEL=URL" in res.stderr
    assert not prefix.exists()
    gone = _uncache(warm_home, "peft-*")
    res = install("--mirror", f"{channel['url']}={mirror.url}/channel", "--mirror", "nvidia=file:///nowhere")
    assert res.returncode == 0, res.stderr
    assert mirror.requests[gone[0]] == 1  # fetched from the mirror named for its channel


# --- large files in segments -----------------------------------------------------------------------------------

SIX = 6 * 2**20  # six segments of SEGMENT_MIN


@pytest.fixture
def six(tmp_path):
    root = tmp_path / "srv6"
    root.mkdir()
    (root / "six.conda").write_bytes(os.urandom(SIX))
    return root, cache.sha256_file(root / "six.conda")


def _fetch_six(pkgs, srv, sha, narrated=None):
    return cache.Cache(pkgs).fetch(f"{srv.url}/six.conda", sha, "six.conda",
                                   narrate=(narrated.append if narrated is not None else lambda m: None))


def _leftovers(pkgs):
    return [p.name for p in pkgs.rglob(".*.part*")]


def test_a_large_file_comes_in_segments_over_several_connections_and_sooner(tmp_path, six, monkeypatch):
    root, sha = six
    srv = NetSim(root, delay_s=0.02, rate=4 * 2**20).start()  # a capped link: 4 MiB/s a connection
    try:
        t = time.monotonic()
        path, got = _fetch_six(tmp_path / "pkgs", srv, sha)
        segmented = time.monotonic() - t
        ranged, at_once = srv.range_requests["six.conda"], srv.max_active
        monkeypatch.setattr(download, "SEGMENTS", 1)  # the same download over one connection, same server and run
        t = time.monotonic()
        path1, got1 = _fetch_six(tmp_path / "pkgs-one", srv, sha)
        one = time.monotonic() - t
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha == cache.sha256_file(path1) and got == got1 == SIX
    assert ranged >= 3 and at_once >= 3, (ranged, at_once)
    assert segmented < one / 2, (segmented, one)
    assert not _leftovers(tmp_path / "pkgs")  # the sidecar went with the part


def test_a_connection_that_keeps_up_stays_alone_and_one_that_slows_down_is_joined(tmp_path, monkeypatch):
    """Helpers join the first connection only while it brings less than SPLIT_BELOW bytes a second: taken every
    PACE_EVERY seconds for as long as it reads, so a server that slows a connection down after a burst gets them
    then, for what is left."""
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(12 * 2**20)
    (root / "twelve.conda").write_bytes(data)
    sha = cache.sha256_file(root / "twelve.conda")
    monkeypatch.setattr(download, "SPLIT_BELOW", 64 << 10)  # kept up with: only a half-second stall is slower
    monkeypatch.setattr(download, "PACE_EVERY", 0.5)
    srv = NetSim(root, rate=16 * 2**20).start()
    try:
        path, got = cache.Cache(tmp_path / "pkgs").fetch(f"{srv.url}/twelve.conda", sha, "twelve.conda")
        alone = srv.requests["twelve.conda"]
    finally:
        srv.shutdown()
    assert alone == 1 and got == len(data) and cache.sha256_file(path) == sha

    monkeypatch.setattr(download, "SPLIT_BELOW", 8 * 2**20)
    monkeypatch.setattr(download, "PACE_EVERY", 0.1)
    srv = NetSim(root, rate=2**20, burst=4 * 2**20).start()  # 4 MiB at once, then 1 MiB/s a connection
    try:
        path, got = cache.Cache(tmp_path / "pkgs2").fetch(f"{srv.url}/twelve.conda", sha, "twelve.conda")
        starts = srv.range_starts["twelve.conda"]
    finally:
        srv.shutdown()
    assert got == len(data) and cache.sha256_file(path) == sha
    assert len(starts) >= 3 and min(starts[1:]) > 4 * 2**20, starts  # joined after the burst, for the rest


@pytest.mark.parametrize("case", ["segments", "whole-again", "resumed", "lie"])
def test_the_sha256_taken_while_a_file_comes_is_that_of_the_part_on_disk(tmp_path, monkeypatch, case):
    """download.into's sha256 (taken while the bytes come, from the part on disk) is the part's as it ends,
    against hashlib on the finished file: in segments, after a cut answered by a server without Range (the part
    starts over with the file's bytes where other ones were: so does the hash), resumed from a part a killed run kept, and for bytes that are not the file's
    (a lie: the hash vouches for what is on disk, not for what was asked)."""
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(12 * 2**20)
    (root / "f.conda").write_bytes(data)
    part = tmp_path / ".f.conda.part"
    srv = NetSim(root, rate=8 * 2**20 if case == "segments" else 0, ranges=case != "whole-again").start()
    if case == "whole-again":
        srv.inject("f.conda", "lie-cut")  # other bytes first: hashed on, they would spoil the sum
    elif case == "lie":
        srv.inject("f.conda", "lie")
    elif case == "resumed":
        part.write_bytes(data[:5 * 2**20 + 7])
    try:
        got, sha = download.into(f"{srv.url}/f.conda", part)
        requests, ranged = srv.requests["f.conda"], srv.range_requests["f.conda"]
    finally:
        srv.shutdown()
    assert sha == hashlib.sha256(part.read_bytes()).hexdigest()
    assert (sha == hashlib.sha256(data).hexdigest()) == (case != "lie")
    if case == "segments":
        assert ranged >= 3, ranged
    elif case == "whole-again":
        assert requests == 2 and got == len(data) + len(data) // 2, (requests, got)
    elif case == "resumed":
        assert got == len(data) - (5 * 2**20 + 7)


def test_a_server_that_ignores_range_gets_one_plain_download(tmp_path, six):
    root, sha = six
    srv = NetSim(root, ranges=False).start()
    try:
        path, got = _fetch_six(tmp_path / "pkgs", srv, sha)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha and got == SIX
    assert srv.requests["six.conda"] == 1 and not _leftovers(tmp_path / "pkgs")


def test_a_server_that_answers_only_open_ranges_gets_the_rest_over_the_first_connection(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=4 * 2**20, closed_ranges=False).start()  # `bytes=N-`: 206; `bytes=N-M`: the whole
    # file.  Capped, so the helpers ask for their closed ranges before the first connection could have read it all
    narrated = []
    try:
        path, got = _fetch_six(tmp_path / "pkgs", srv, sha, narrated)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha and not _leftovers(tmp_path / "pkgs")
    assert any("closed range" in m for m in narrated), narrated


def test_a_cut_segment_is_retried_from_where_it_stopped(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=8 * 2**20).start()
    srv.inject("six.conda", "none", "cut")  # the first request goes through; the next (a helper's segment) is cut
    narrated = []
    try:
        path, got = _fetch_six(tmp_path / "pkgs", srv, sha, narrated)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha
    assert got == SIX  # no byte twice: the cut segment went on from its own offset
    assert any("segment" in m and "closed after" in m and "retrying (1/4)" in m for m in narrated), narrated
    assert any("segment" in m and "resuming at" in m for m in narrated), narrated


def test_a_segment_that_fails_stops_the_others_and_its_error_is_raised(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=2**20).start()  # each segment would take a second
    srv.inject("six.conda", "none", "404")
    t = time.monotonic()
    try:
        with pytest.raises(NetworkError) as info:
            _fetch_six(tmp_path / "pkgs", srv, sha)
        took = time.monotonic() - t
    finally:
        srv.shutdown()
    assert "HTTP 404" in info.value.why and took < 0.8, took
    part = next((tmp_path / "pkgs").rglob(".six.conda.part"))
    assert download.kept_segments(part)  # kept, with its sidecar, for the next run


def test_extra_connections_are_bounded_in_the_whole_process(tmp_path, monkeypatch):
    root = tmp_path / "srv"
    root.mkdir()
    for i in range(3):
        (root / f"s{i}.bin").write_bytes(os.urandom(4 * 2**20))
    monkeypatch.setattr(download, "_EXTRA", threading.BoundedSemaphore(2))
    srv = NetSim(root, rate=8 * 2**20).start()
    try:
        items = [(f"{srv.url}/s{i}.bin", cache.sha256_file(root / f"s{i}.bin"), f"s{i}.bin") for i in range(3)]
        results = cache.Cache(tmp_path / "pkgs").fetch_all(items, jobs=3)
    finally:
        srv.shutdown()
    assert all(cache.sha256_file(p) == sha for (p, _), (_, sha, _) in zip(results, items))
    # a connection per file and two more in all; each of those 5 may overlap its next request with the last moments
    # of its previous answer (all its bytes arrived, the server's thread not yet done with it: on a loaded machine
    # several at once, so at most 2 x 5 answers); unbounded, it would be up to 3 + 3 x 7 = 24
    assert srv.max_active <= 2 * (3 + 2), srv.max_active
    assert sum(srv.range_requests.values()) > 3  # some files did get a helper


KILLED = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from lorastrap.install import cache, download
cache.Cache(Path(sys.argv[2])).fetch(sys.argv[3], sys.argv[4], "six.conda")
"""


def test_a_download_killed_mid_way_resumes_its_segments_in_the_next_run(tmp_path, six):
    root, sha = six
    srv = NetSim(root, rate=2**20).start()  # slow: the first connection is joined by helpers
    pkgs = tmp_path / "pkgs"
    sidecar = pkgs / "archives" / sha / ".six.conda.part.segments"
    try:
        proc = subprocess.Popen([sys.executable, "-c", KILLED, str(ROOT / "installer"), str(pkgs),
                                 f"{srv.url}/six.conda", sha])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the sidecar records some bytes of each segment
            try:
                segments = json.loads(sidecar.read_text())["segments"]
                if len(segments) >= 3 and all(done > 0 for _, _, done in segments):
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        else:
            pytest.fail("the sidecar never recorded progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first_run = srv.requests["six.conda"]
        srv.rate = 0
        narrated = []
        path, got = _fetch_six(pkgs, srv, sha, narrated)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha
    assert 0 < got < SIX, got  # only what the first run had not written
    again = srv.range_starts["six.conda"][first_run:]
    assert again and all(start > 0 for start in again), again  # each segment from where it stopped
    assert any("resuming at" in m for m in narrated) and not _leftovers(pkgs)


def test_a_sidecar_that_lies_ends_in_a_checksum_mismatch_and_a_download_from_the_start(tmp_path, six):
    root, sha = six
    c = cache.Cache(tmp_path / "pkgs")
    part = c.entry(sha, "six.conda").with_name(".six.conda.part")
    part.parent.mkdir(parents=True)
    with open(part, "wb") as f:
        f.truncate(SIX)  # holes only
    half = SIX // 2
    part.with_name(part.name + ".segments").write_text(
        json.dumps({"total": SIX, "segments": [[0, half, half], [half, SIX, 0]]}))  # claims the first half
    srv = NetSim(root).start()
    narrated = []
    try:
        path, got = c.fetch(f"{srv.url}/six.conda", sha, "six.conda", narrate=narrated.append)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha
    assert srv.range_starts["six.conda"][0] == half and 0 in srv.range_starts["six.conda"][1:]
    assert any("again from the start" in m for m in narrated), narrated
    assert got == SIX - half + SIX and not _leftovers(tmp_path / "pkgs")


def test_a_kept_segmented_part_of_a_file_changed_on_the_server_starts_afresh(tmp_path, six):
    root, sha = six
    good = (root / "six.conda").read_bytes()
    _served_as(root / "six.conda", os.urandom(SIX), minutes=1)  # a mirror still syncing: not the lock's file yet
    srv = NetSim(root, rate=2**20).start()
    srv.inject("six.conda", "none", "404")  # a segment fails: the part is kept, with its sidecar
    pkgs = tmp_path / "pkgs"
    try:
        with pytest.raises(NetworkError):
            _fetch_six(pkgs, srv, sha)
        part = next(pkgs.rglob(".six.conda.part"))
        assert json.loads(download.sidecar(part).read_text())["validator"].startswith('"')
        _served_as(root / "six.conda", good, minutes=2)  # synced
        srv.rate = 0
        narrated: list[str] = []
        path, got = _fetch_six(pkgs, srv, sha, narrated)
    finally:
        srv.shutdown()
    assert cache.sha256_file(path) == sha and got == SIX, got  # no byte of the other file kept, none twice
    assert srv.if_range["six.conda"][0] is False
    assert any("not of the file the server has now" in m for m in narrated), narrated
    assert not any("does not match" in m for m in narrated) and not _leftovers(pkgs)


# --- a private mirror: credentials ---------------------------------------------------------------------------------

def test_a_mirror_that_wants_credentials_gets_them_from_netrc_or_the_url_and_says_how_when_none(tmp_path, six,
                                                                                               monkeypatch):
    """HTTP Basic credentials from $NETRC / ~/.netrc (per host) or the URL's user:password — for every segment;
    without them a clear NetworkError naming both ways (exit 5), and no password in any message."""
    root, sha = six
    srv = NetSim(root, rate=8 * 2**20, auth="alice:s3cr et").start()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc of the user's
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    try:
        with pytest.raises(NetworkError) as info:
            _fetch_six(tmp_path / "none", srv, sha)
        assert "HTTP 401" in info.value.why and ".netrc" in info.value.fix and info.value.exit_code == 5
        netrc_file = tmp_path / "netrc"
        netrc_file.write_text("machine 127.0.0.1 login alice password \"s3cr et\"\n")
        netrc_file.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc_file))
        path, got = _fetch_six(tmp_path / "by-netrc", srv, sha)
        assert cache.sha256_file(path) == sha and got == SIX
        assert sum(srv.range_requests.values()) >= 3  # the segments carried them too
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        port = srv.url.rsplit(":", 1)[1]
        narrated = []
        path, _ = cache.Cache(tmp_path / "by-url").fetch(f"http://alice:s3cr%20et@127.0.0.1:{port}/six.conda", sha,
                                                         "six.conda", narrate=narrated.append)
        assert cache.sha256_file(path) == sha
        with pytest.raises(NetworkError) as info:  # a wrong password: said without the password
            cache.Cache(tmp_path / "wrong").fetch(f"http://alice:hunter2@127.0.0.1:{port}/six.conda", sha, "six.conda")
        assert "hunter2" not in str(info.value.to_dict()) and "alice:***@" in info.value.what
    finally:
        srv.shutdown()


class _Proxy(http.server.ThreadingHTTPServer):
    """A forward HTTP proxy (absolute-form GETs relayed over http.client), recording each request it relays:
    (URL, whether it carried an Authorization header)."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[tuple[str, bool]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        import http.client
        import urllib.parse
        target = urllib.parse.urlsplit(self.path)
        self.server.seen.append((self.path, "Authorization" in self.headers))
        conn = http.client.HTTPConnection(target.netloc, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        conn.request("GET", target.path or "/", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        conn.close()


def test_through_a_proxy_credentials_go_only_to_their_host_and_redirects_only_where_allowed(tmp_path, served,
                                                                                            monkeypatch):
    """http_proxy set: every request goes through the proxy, with the .netrc credentials of the file's host; a
    redirect to another host is refused there as on a direct connection (urllib alone would follow it, taking the
    credentials along), and one to the same host is followed."""
    srv, root, sha = served
    auth = NetSim(root, auth="alice:pw").start()
    proxy = _Proxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine 127.0.0.1 login alice password pw\n")
    netrc_file.chmod(0o600)
    for var in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("NETRC", str(netrc_file))
    try:
        path, got = cache.Cache(tmp_path / "a").fetch(f"{auth.url}/big.conda", sha, "big.conda")
        assert cache.sha256_file(path) == sha and got == SIZE
        assert proxy.seen == [(f"{auth.url}/big.conda", True)]  # one request, through the proxy, credentials on
        # To another host (localhost is not 127.0.0.1 by name): refused, nothing sent there.
        other = f"http://localhost:{srv.server_address[1]}/big.conda"
        auth.inject("big.conda", f"redirect:{other}")
        with pytest.raises(NetworkError) as info:
            cache.Cache(tmp_path / "b").fetch(f"{auth.url}/big.conda", sha, "big.conda")
        assert "refused a redirect" in info.value.what and "localhost" in info.value.why
        assert not any(u.startswith("http://localhost") for u, _ in proxy.seen)
        # To the same host: followed, the credentials still on.
        auth.inject("big.conda", f"redirect:{auth.url}/big.conda")
        path, _ = cache.Cache(tmp_path / "c").fetch(f"{auth.url}/big.conda", sha, "big.conda")
        assert cache.sha256_file(path) == sha and proxy.seen[-2:] == [(f"{auth.url}/big.conda", True)] * 2
    finally:
        proxy.shutdown()
        auth.shutdown()


def test_a_private_index_gets_its_credentials_and_passes_them_to_its_own_files_only(tmp_path, monkeypatch):
    """--pip-index-url with user:password, or a .netrc entry: the index page is read with them (a 401 without them
    says how to give them, with no password shown); a file it lists on its own host carries the URL's credentials
    on to its download (never into what files() gives, which a lock records), a file elsewhere does not."""
    from lorastrap.locking import pypi_index
    root = tmp_path / "idx"
    (root / "simple" / "demo").mkdir(parents=True)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    srv = NetSim(root, auth="bob:s3cret").start()
    host = srv.url.split("://", 1)[1]
    (root / "simple" / "demo" / "index.html").write_text(
        f'<a href="../../files/demo-1.0-py3-none-any.whl#sha256={"0" * 64}">demo-1.0-py3-none-any.whl</a>\n'
        f'<a href="http://elsewhere.invalid/demo-1.1-py3-none-any.whl">demo-1.1-py3-none-any.whl</a>\n')
    try:
        with pytest.raises(NetworkError) as info:
            pypi_index.files(f"http://bob:wrong@{host}/simple", "demo")
        assert "HTTP 401" in info.value.why and ".netrc" in info.value.fix and "bob:***@" in info.value.what
        assert "wrong" not in str(info.value.to_dict())
        index = f"http://bob:s3cret@{host}/simple"
        found = {f.filename: f.url for f in pypi_index.files(index, "demo")}  # what a lock records: no password
        assert found == {"demo-1.0-py3-none-any.whl": f"http://{host}/files/demo-1.0-py3-none-any.whl",
                         "demo-1.1-py3-none-any.whl": "http://elsewhere.invalid/demo-1.1-py3-none-any.whl"}
        assert pypi_index.file_url(index, "demo", "demo-1.0-py3-none-any.whl") == \
            f"http://bob:s3cret@{host}/files/demo-1.0-py3-none-any.whl"  # downloaded now: with them
        assert pypi_index.file_url(index, "demo", "demo-1.1-py3-none-any.whl") == \
            "http://elsewhere.invalid/demo-1.1-py3-none-any.whl"
        # The same origin however written (host case, the scheme's own port spelled out); not another port or scheme.
        o = lambda u: credentials.origin(urllib.parse.urlsplit(u))  # noqa: E731
        assert o("https://Files.Example:443/a") == o("https://files.example/b") != o("http://files.example/b")
        assert o("https://files.example:8443/a") != o("https://files.example/a")
        netrc_file = tmp_path / "netrc"
        netrc_file.write_text("machine 127.0.0.1 login bob password s3cret\n")
        netrc_file.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc_file))
        assert len(pypi_index.files(f"{srv.url}/simple", "demo")) == 2
    finally:
        srv.shutdown()


def test_an_https_url_redirected_to_http_sends_no_credentials(tmp_path, served, monkeypatch):
    """A .netrc login is for the host; after an https URL redirected to http (another port of the same host) it
    would go out unencrypted: it is not sent (the server then says 401, and the download fails saying so)."""
    import ssl
    srv, root, sha = served
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                           "-out", str(cert)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("no openssl to make a certificate")
    plain = NetSim(root, auth="alice:pw").start()
    tls = NetSim(root)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    tls.start()
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine 127.0.0.1 login alice password pw\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    https_url = f"https://127.0.0.1:{tls.server_address[1]}/big.conda"
    try:
        path, _ = cache.Cache(tmp_path / "a").fetch(https_url, sha, "big.conda")  # the TLS server itself works
        assert cache.sha256_file(path) == sha
        tls.inject("big.conda", f"redirect:{plain.url}/big.conda")
        with pytest.raises(NetworkError) as info:
            cache.Cache(tmp_path / "b").fetch(https_url, sha, "big.conda")
        assert "HTTP 401" in info.value.why and plain.requests["big.conda"] == 1
        path, _ = cache.Cache(tmp_path / "c").fetch(f"{plain.url}/big.conda", sha, "big.conda")  # http from the start:
        assert cache.sha256_file(path) == sha  # the .netrc login goes, as the user asked for plain http
    finally:
        tls.shutdown()
        plain.shutdown()
