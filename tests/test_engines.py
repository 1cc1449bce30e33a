"""Engines: which micromamba/mamba releases lorastrap hands a lock to (envs/engines.yaml), and the hand-over."""

import os
import shutil
import stat
import subprocess
import time

import pytest
import yaml
from conftest import MAMBA, ROOT

from lorastrap.install import ahead, engines
from lorastrap.locking import lockfile, uvexe
from lorastrap.install.cache import Cache
from lorastrap.core.errors import UsageError

TEST_ENVS = ROOT / "tests" / "envs"


@pytest.mark.parametrize("kind,version,refused_for", [
    ("micromamba", "1.5.12", None), ("mamba", "1.5.8", "1884"), ("mamba", "2.0.5", None),
    ("micromamba", "2.1.0", None), ("micromamba", "2.1.1", "4052"), ("mamba", "2.3.2", "4052"),
    ("micromamba", "2.3.3", None), ("micromamba", "2.6.2", None), ("micromamba", "2.7.0", "4352"),
    ("micromamba", "2.8.1", "4352"), ("micromamba", "2.8.2", None)])
def test_known_bad_releases_are_refused_with_their_source(kind, version, refused_for):
    why = engines.judge(kind, version, engines.facts())
    if refused_for is None:
        assert why is None
    else:
        assert f"issues/{refused_for}" in why and version in why


def _standin(tmp_path, version):
    """A stand-in answering `--version` as a release that cannot be run here (none is installable offline)."""
    exe = tmp_path / "micromamba"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_a_refused_release_gives_way_to_the_embedded_engine_or_stops_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("MAMBA_EXE", str(_standin(tmp_path, "2.2.0")))
    said = []
    assert engines.find("auto", narrate=said.append).kind == "rattler"
    assert "known-bad release" in said[0] and "issues/4052" in said[0] and "embedded engine" in said[0]
    with pytest.raises(UsageError) as info:
        engines.find("micromamba")
    assert info.value.exit_code == 2 and "issues/4052" in info.value.why and "--engine rattler" in info.value.fix
    os.chmod(os.environ["MAMBA_EXE"], 0o644)
    with pytest.raises(UsageError) as info:
        engines.find("micromamba")
    assert "not an executable file" in info.value.why
    monkeypatch.setenv("LORASTRAP_ENGINE", "conda")
    with pytest.raises(UsageError) as info:
        engines.find()
    assert "LORASTRAP_ENGINE='conda'" in info.value.what


def test_auto_picks_only_a_tested_release_and_a_named_engine_any_not_known_bad(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("MAMBA_EXE", str(_standin(tmp_path, "2.3.3")))  # not known bad, never run here
    said = []
    assert engines.find("auto", narrate=said.append).kind == "rattler"
    assert "not a release lorastrap is tested with" in said[0] and "1.5.12" in said[0]
    assert engines.find("micromamba").version == "2.3.3"  # asked for by name: used
    monkeypatch.setenv("MAMBA_EXE", str(_standin(tmp_path, "1.5.12")))
    assert engines.find("auto").version == "1.5.12"


@pytest.mark.skipif(MAMBA is None, reason="no micromamba (not at ../shared/tools/micromamba/bin, MAMBA_EXE or on PATH)")
def test_the_real_micromamba_is_found_with_its_version(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA_EXE", str(MAMBA))
    eng = engines.find("micromamba")
    assert eng.version == "1.5.12" and eng.describe() == f"micromamba 1.5.12 ({MAMBA})"
    assert engines.engine_root(eng, tmp_path / "pkgs" / "extracted") == tmp_path / "pkgs" / "mamba" / "micromamba-1.5.12"


def test_the_hand_over_is_a_channel_of_links_without_pip_entries_that_leaves_the_archives_as_checked(warm_home, tmp_path):
    lk = lockfile.read_lock(warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml")
    cache = Cache(warm_home / "pkgs")
    conda = [e for e in lk.for_platform("linux-64") if e.manager == "conda"]
    assert any(e.manager == "pip" for e in lk.for_platform("linux-64"))
    archives = {e.name: cache.entry(e.sha256, e.filename) for e in conda}
    for e in conda:  # checked now (an older hand-over may have moved their ctimes): hashed, nothing downloaded
        assert cache.fetch(e.url, e.sha256, e.filename)[1] == 0
    out = engines.hand_over(lk, "linux-64", archives, cache.root / "channel", tmp_path)
    assert out.name.endswith("-lock.yml")  # micromamba reads a file as a lock only then (mamba#3039)
    raw = yaml.safe_load(out.read_text())
    assert {p["manager"] for p in raw["package"]} == {"conda"} and len(raw["package"]) == len(conda)
    assert {p["category"] for p in raw["package"]} == {"main"}  # mamba#1917
    for p in raw["package"]:
        path = (cache.root / "channel" / p["url"].rsplit("/", 2)[-2] / p["url"].rsplit("/", 1)[-1])
        assert p["url"] == path.as_uri() and path.parent.name in ("linux-64", "noarch")
        assert os.path.samefile(path, archives[p["name"]])  # a link: no copy, no extra disk
    again = engines.hand_over(lk, "linux-64", archives, cache.root / "channel", tmp_path)  # same URLs next run
    assert again.read_text() == out.read_text()
    # the archives keep the stats they were checked with (a new hard link would move their ctime, and the next
    # run would hash every archive again)
    assert all(cache.is_ready(e.sha256, e.filename) for e in conda)
    for e in conda:
        (cache.root / "channel" / e.url.rsplit("/", 2)[-2] / e.filename).unlink()
    engines.hand_over(lk, "linux-64", archives, cache.root / "channel", tmp_path)  # links made anew
    assert all(cache.is_ready(e.sha256, e.filename) for e in conda)


def test_the_pip_step_installs_checked_wheels_with_uv_or_pip(channel, warm_home, tmp_path, monkeypatch):
    from conftest import run_cli
    prefix = tmp_path / "env"
    res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "--prefix", str(prefix), "--no-verify", "--engine", "rattler")
    assert res.returncode == 0 and "pip entries installed with uv" in res.stderr, res.stderr
    lk = lockfile.read_lock(warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml")
    e = next(e for e in lk.for_platform("linux-64") if e.manager == "pip")
    wheel = [(e.name, Cache(warm_home / "pkgs").entry(e.sha256, e.filename), e.sha256)]
    site = next(prefix.glob("lib/python3*/site-packages"))
    for how in ("uv", "pip"):
        for p in list(site.glob("lorastrap_testwheel*")):
            shutil.rmtree(p)
        if how == "pip":
            monkeypatch.setattr(uvexe, "find", lambda: None)  # a machine without uv: pip is the fallback
        assert engines.pip_install(prefix, wheel, tmp_path, uv_cache=tmp_path / "uv") == how
        info = next(site.glob("lorastrap_testwheel-1.0.dist-info"))
        assert (info / "INSTALLER").read_text().strip() == how and (site / "lorastrap_testwheel" / "__init__.py").exists()
        assert not (prefix / ".lock").exists()
    bad = [(e.name, wheel[0][1], "0" * 64)]  # the hashes are required again by the installer itself
    with pytest.raises(engines.EngineError):
        engines.pip_install(prefix, bad, tmp_path, uv_cache=tmp_path / "uv")


def test_a_worker_started_ahead_leaves_quietly_when_not_needed_and_answers_when_asked(tmp_path):
    """The embedded engine's worker is started before its request (its start-up overlaps the install's checks):
    one never asked reads the end of its stdin and exits 0 by itself (not killed); one asked answers, and a worker
    started before a children record opened is recorded in it (pid and start time) before it does any work."""
    from lorastrap.core import subproc
    idle = subproc.Worker("locking.rattler_worker")
    idle.discard()
    assert idle.proc.returncode == 0  # left on its own: a kill would be -9

    record = tmp_path / "children"
    ahead = subproc.Worker("locking.rattler_worker")
    with subproc.recording_groups(record):
        answer = ahead.ask({"op": "index", "channel": str(tmp_path / "no-such-channel")}, timeout=60)
        lines = [l for l in record.read_text().splitlines()[1:]]
        assert any(f'"pid": {ahead.proc.pid}' in l for l in lines), lines
    assert answer["ok"] is False and answer["error"]  # a failure is an answer too, not a crash


def test_a_worker_is_started_ahead_only_for_the_embedded_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no micromamba/mamba anywhere
    monkeypatch.delenv("MAMBA_EXE", raising=False)
    try:
        ahead.start("micromamba")
        assert not ahead.WORKERS
        ahead.start("auto")
        assert len(ahead.WORKERS) == 1
        first = ahead.WORKERS[0]
        ahead.start("rattler")  # one at most
        assert ahead.WORKERS == [first]
    finally:
        ahead.discard()
    assert not ahead.WORKERS and first.proc.returncode == 0
    mm = tmp_path / "micromamba"
    mm.write_text("#!/bin/sh\necho 1.5.12\n")
    mm.chmod(0o755)
    ahead.start("auto")  # a micromamba on PATH: auto will most likely use it
    assert not ahead.WORKERS



def test_the_worker_is_started_first_of_all_on_a_guess_from_the_command_line(monkeypatch, tmp_path):
    """lorastrap/__main__.py starts the embedded engine's worker before the command line is parsed: from its
    --engine flag when it names one, else as auto would choose.  A guess that fails (a LORASTRAP_HOME lorastrap
    cannot use, or anything else) starts nothing and says nothing: the install meets that error itself."""
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path))
    mm = tmp_path / "bin" / "micromamba"
    mm.parent.mkdir()
    mm.write_text("#!/bin/sh\necho 1.5.12\n")
    mm.chmod(0o755)
    monkeypatch.setenv("PATH", str(mm.parent))
    monkeypatch.delenv("MAMBA_EXE", raising=False)
    monkeypatch.delenv("LORASTRAP_ENGINE", raising=False)
    try:
        ahead.start_guessing(["--prefix", "x"])  # auto with a micromamba on PATH: not the embedded engine
        ahead.start_guessing(["--engine=micromamba", "--prefix", "x"])
        ahead.start_guessing(["--engine", "no-such-engine"])  # not a choice: auto's guess
        assert not ahead.WORKERS
        ahead.start_guessing(["--prefix", "x", "--engine", "rattler"])
        assert len(ahead.WORKERS) == 1
    finally:
        ahead.discard()
    monkeypatch.setenv("LORASTRAP_HOME", "relative/home")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    ahead.start_guessing([])
    assert not ahead.WORKERS
    monkeypatch.setattr(ahead, "candidates", lambda choice: 1 / 0)
    ahead.start_guessing([])  # whatever it was, the install meets it again and explains it
    assert not ahead.WORKERS

def _tree(root):
    """{path: (bytes, mode)} of every file and link under ROOT (a link: its target)."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            rel = os.path.relpath(p, root)
            out[rel] = (os.readlink(p).encode(), 0) if os.path.islink(p) else (open(p, "rb").read(),
                                                                             stat.S_IMODE(os.lstat(p).st_mode))
    return out


def _handed_over(warm_home, tmp_path):
    lk = lockfile.read_lock(warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml")
    cache = Cache(warm_home / "pkgs")
    conda = [e for e in lk.for_platform("linux-64") if e.manager == "conda"]
    archives = {e.name: cache.entry(e.sha256, e.filename) for e in conda}
    return conda, archives, engines.hand_over(lk, "linux-64", archives, tmp_path / "channel", tmp_path)


def test_archives_unpacked_ahead_are_the_entries_rattler_makes_and_the_link_step_uses_them(warm_home, tmp_path):
    """The oracle is py-rattler itself: the same lock installed by rattler alone (it unpacks at the link step)
    leaves, for every package, the same files with the same modes and a byte-identical metadata file (DIST.lock);
    and the entries the worker unpacked ahead are linked from as they are (their inodes stay)."""
    from lorastrap.core import subproc
    from lorastrap.install.cache import dist_name
    conda, archives, lock = _handed_over(warm_home, tmp_path)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    alone = subproc.worker("locking.rattler_worker", {"op": "install", "lock": str(lock), "platform": "linux-64",
                                                        "prefix": str(tmp_path / "env-alone"),
                                                        "cache_dir": str(theirs)}, timeout=120)
    assert alone["ok"] and "extracted" not in alone, alone
    worker = subproc.Worker("locking.rattler_worker")
    dists = {e.name: dist_name(archives[e.name].name) for e in conda}
    for e in conda:
        assert worker.send({"op": "extract", "archive": str(archives[e.name]), "dist": dists[e.name],
                            "sha256": e.sha256, "cache_dir": str(ours)})
    deadline = time.monotonic() + 60
    while not all((ours / f"{d}.lock").exists() for d in dists.values()) and time.monotonic() < deadline:
        time.sleep(0.05)  # each entry's metadata file is written last, once its folder is in place
    inodes = {d: os.stat(ours / d / "info" / "index.json").st_ino for d in dists.values()}
    answer = worker.ask({"op": "install", "lock": str(lock), "platform": "linux-64",
                         "prefix": str(tmp_path / "env-ahead"), "cache_dir": str(ours)}, timeout=120)
    assert answer["ok"] and answer["extracted"] == {d: "ok" for d in dists.values()}, answer
    assert inodes == {d: os.stat(ours / d / "info" / "index.json").st_ino for d in dists.values()}
    for d in dists.values():
        assert (ours / f"{d}.lock").read_bytes() == (theirs / f"{d}.lock").read_bytes(), d
        assert _tree(ours / d) == _tree(theirs / d), d
    here, there = str(tmp_path / "env-ahead").encode(), str(tmp_path / "env-alone").encode()  # the same length
    linked = {k: (v.replace(here, there), mode) for k, (v, mode) in _tree(tmp_path / "env-ahead").items()
              if not k.startswith("conda-meta")}
    assert linked and linked == {k: v for k, v in _tree(tmp_path / "env-alone").items()
                                 if not k.startswith("conda-meta")}
    assert not [p for p in ours.iterdir() if ".partial." in p.name]


def test_an_archive_whose_unpacked_bytes_are_not_the_locks_is_left_to_the_link_step(warm_home, tmp_path):
    """A wrong sha256 (the bytes extract() read are not the lock's): no entry is made, the answer says why.  And
    what a worker killed while unpacking left on this node (its pid gone) is removed by the next one."""
    from lorastrap.core import fsutil, subproc
    from lorastrap.install.cache import dist_name
    conda, archives, _ = _handed_over(warm_home, tmp_path)
    e = conda[0]
    dist, cache_dir = dist_name(archives[e.name].name), tmp_path / "cache"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = cache_dir / f".{dist}.partial.{fsutil.hostname()}.{gone.pid}.d"
    other = cache_dir / f".other-1.0-h0_0.partial.{fsutil.hostname()}.{gone.pid}.d"  # another package's
    live = cache_dir / f".other-1.0-h0_0.partial.{fsutil.owner_tag()}.d"  # a live one's (this process)
    for d in (stale, other, live):
        (d / "info").mkdir(parents=True)
    worker = subproc.Worker("locking.rattler_worker")
    assert worker.send({"op": "extract", "archive": str(archives[e.name]), "dist": dist, "sha256": "0" * 64,
                        "cache_dir": str(cache_dir)})
    deadline = time.monotonic() + 60
    while stale.exists() and time.monotonic() < deadline:  # swept as the extract starts: it is under way
        time.sleep(0.02)
    answer = worker.ask({"op": "index", "channel": str(tmp_path / "no-such-channel")}, timeout=60)
    assert answer["extracted"][dist].startswith(f"unpacked bytes have sha256 {e.sha256}"), answer
    assert list(cache_dir.iterdir()) == [live]  # no entry, no metadata file, no dead worker's part, not its own


def test_a_worker_sent_work_for_an_install_that_ends_without_linking_is_stopped_at_once(warm_home, tmp_path):
    """An install that fails after its downloads (a refused package, say) must not leave its worker unpacking
    the rest of the queue into the cache: discarded, a worker that was sent work is killed, not waited for."""
    from lorastrap.core import subproc
    from lorastrap.install.cache import dist_name
    conda, archives, _ = _handed_over(warm_home, tmp_path)
    worker = subproc.Worker("locking.rattler_worker")
    for e in conda:
        worker.send({"op": "extract", "archive": str(archives[e.name]), "dist": dist_name(archives[e.name].name),
                     "sha256": e.sha256, "cache_dir": str(tmp_path / "cache")})
    worker.discard(wait=False)
    assert worker.proc.returncode == -9  # killed, and reaped


def test_a_worker_let_go_unwaited_does_not_go_on_unpacking_into_the_cache(warm_home, tmp_path):
    """An install that fails after some archives were handed over (a later download fails, Ctrl-C) lets the worker
    go with ahead.discard(wait=False).  Once that has returned, the worker must not write into the package cache
    any more: a library caller may remove or reuse LORASTRAP_HOME right after cli.main returned."""
    from lorastrap.core import subproc
    conda, archives, _ = _handed_over(warm_home, tmp_path)
    cache_dir = tmp_path / "cache"
    ahead.WORKERS.append(subproc.Worker("locking.rattler_worker"))
    try:
        for e in conda:
            assert ahead.unpack(archives[e.name], e.sha256, cache_dir)
        ahead.discard(wait=False)  # what cli/install.py does when the install fails
        at_return = set(os.listdir(cache_dir)) if cache_dir.exists() else set()
        time.sleep(3)
        later = set(os.listdir(cache_dir)) if cache_dir.exists() else set()
        assert later == at_return, f"{len(later - at_return)} entries written after the worker was let go"
    finally:
        ahead.WORKERS.clear()


def test_sending_work_never_waits_on_a_busy_worker_and_keeps_the_order(tmp_path):
    """send() is called from download threads: it must return at once even while the worker reads nothing (here
    it is stopped; unpacking a big archive holds its GIL the same way) and the pipe is full — ~300 KiB of requests
    against a 64 KiB pipe.  The worker then carries them all out, in order, before the request it answers."""
    import signal
    import threading

    from lorastrap.core import subproc
    worker = subproc.Worker("locking.rattler_worker")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        dists = [f"pkg{i:04d}-1.0-h0_0" for i in range(1000)]
        sender = threading.Thread(target=lambda: [worker.send(
            {"op": "extract", "archive": str(tmp_path / "missing" / f"{d}.conda"), "dist": d, "sha256": "0" * 64,
             "cache_dir": str(tmp_path / "cache")}) for d in dists])
        sender.start()
        sender.join(timeout=30)
        assert not sender.is_alive(), "send() waited for a worker that reads nothing"
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    answer = worker.ask({"op": "index", "channel": str(tmp_path / "no-such-channel")}, timeout=120)
    assert list(answer["extracted"]) == dists, list(answer["extracted"])[:3]
    assert all(why not in ("ok", "present") for why in answer["extracted"].values())  # no such archives
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_worker_started_ahead_that_died_is_replaced_at_the_link_step(warm_home, tmp_path):
    """Unpacking ahead is a speed-up only: if the worker started ahead is gone (killed, crashed in py-rattler),
    the link step starts a fresh one, which unpacks what it needs itself."""
    import signal

    from lorastrap.core import subproc
    _, _, lock = _handed_over(warm_home, tmp_path)
    dead = subproc.Worker("locking.rattler_worker")
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    ahead.WORKERS.append(dead)
    try:
        fresh = engines.link(engines.Engine("rattler"), prefix=tmp_path / "env", lock_file=lock, platform="linux-64",
                             cache_dir=tmp_path / "cache")
    finally:
        ahead.WORKERS.clear()
    assert fresh == frozenset() and (tmp_path / "env" / "conda-meta").is_dir()


def test_a_worker_started_ahead_that_dies_after_the_link_step_took_it_is_replaced_too(warm_home, tmp_path):
    """The worker started ahead was alive when the link step took it, and died before it began to link (killed
    while it unpacked ahead, or a crash there): a fresh worker links, and the install goes on."""
    import signal
    import threading

    from lorastrap.core import subproc
    _, _, lock = _handed_over(warm_home, tmp_path)
    doomed = subproc.Worker("locking.rattler_worker")
    os.kill(doomed.proc.pid, signal.SIGSTOP)  # it reads nothing: it dies before it begins to link
    ahead.WORKERS.append(doomed)
    narrated = []
    threading.Timer(0.5, lambda: os.killpg(doomed.proc.pid, signal.SIGKILL)).start()
    try:
        fresh = engines.link(engines.Engine("rattler"), prefix=tmp_path / "env", lock_file=lock, platform="linux-64",
                             cache_dir=tmp_path / "cache", narrate=narrated.append)
    finally:
        ahead.WORKERS.clear()
    assert fresh == frozenset() and (tmp_path / "env" / "conda-meta").is_dir()
    assert any("linking with a fresh one" in m for m in narrated), narrated


def test_what_is_still_queued_when_the_link_request_comes_is_left_to_the_link_step(warm_home, tmp_path):
    """The worker unpacks one archive at a time; the link step unpacks several at once.  So once the request it
    answers has come, the extract requests still queued are left ("left") to rattler.install, which unpacks them
    itself: the environment is whole either way."""
    import signal
    import threading

    from lorastrap.core import subproc
    from lorastrap.install.cache import dist_name
    conda, archives, lock = _handed_over(warm_home, tmp_path)
    worker = subproc.Worker("locking.rattler_worker")
    os.kill(worker.proc.pid, signal.SIGSTOP)  # everything reaches its stdin before it reads a line
    answer = {}
    try:
        for e in conda:
            worker.send({"op": "extract", "archive": str(archives[e.name]), "dist": dist_name(archives[e.name].name),
                         "sha256": e.sha256, "cache_dir": str(tmp_path / "cache")})
        asking = threading.Thread(target=lambda: answer.update(worker.ask(
            {"op": "install", "lock": str(lock), "platform": "linux-64", "prefix": str(tmp_path / "env"),
             "cache_dir": str(tmp_path / "cache")}, timeout=120)))
        asking.start()
        time.sleep(1)  # the last request written into the pipe too
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    asking.join(timeout=120)
    assert answer["ok"], answer
    assert set(answer["extracted"].values()) <= {"ok", "left"} and "left" in answer["extracted"].values(), answer
    assert len(list((tmp_path / "env" / "conda-meta").glob("*.json"))) == len(conda)


@pytest.mark.skipif(MAMBA is None, reason="no micromamba (not at ../shared/tools/micromamba/bin, MAMBA_EXE or on PATH)")
def test_every_install_sweeps_what_killed_workers_left_half_unpacked(channel, warm_home, tmp_path):
    """A worker killed while it unpacked leaves .DIST.partial.HOST.PID.d in the package cache: the next install
    removes it whatever it unpacks (here with micromamba: no worker at all), and leaves a live one's alone."""
    from conftest import run_cli

    from lorastrap.core import fsutil
    extracted = warm_home / "pkgs" / "extracted"
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = extracted / f".zlib-1.3.1-h0_0.partial.{fsutil.hostname()}.{gone.pid}.d"
    live = extracted / f".zlib-1.3.1-h0_0.partial.{fsutil.owner_tag()}.d"  # this test's own process: alive
    for d in (dead, live):
        (d / "info").mkdir(parents=True)
    res = run_cli("install", "--envs-dir", str(ROOT / "tests" / "envs"), "--channel", channel["url"],
                  "--pip-index-url", channel["simple"], "--prefix", str(tmp_path / "env"), "--no-verify",
                  "--engine", "micromamba", env={"MAMBA_EXE": str(MAMBA)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert not dead.exists() and live.exists()
