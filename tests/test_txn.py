"""The transaction's edges with real processes: signals held at the point of no return, the repair races, children
that die with lorastrap, and the package cache that environments share (poisoning, healing, --link-mode copy)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, alive, dies_within, run_cli

from lorastrap.install import txn
from lorastrap.core.errors import Interrupted

TEST_ENVS = ROOT / "tests" / "envs"
CUDA = {"CONDA_OVERRIDE_CUDA": "12.4"}
USER = Path("mydata") / "x.txt"


def _args(channel, prefix, *extra, envs=TEST_ENVS):
    return ["--envs-dir", str(envs), "--channel", channel["url"], "--pip-index-url", channel["simple"],
            "--prefix", str(prefix), *extra]


def _start(cmd, channel, prefix, *extra, env=None, envs=TEST_ENVS):
    full = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "lorastrap", cmd, *_args(channel, prefix, *extra, envs=envs)],
                            cwd=ROOT, env=full, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, text, timeout=60):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if text in line:
            return "".join(seen)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"never saw {text!r}: {''.join(seen)}")


def _smoke(prefix):
    res = subprocess.run([str(prefix / "bin" / "lora-smoke")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _installed(channel, prefix, env=None, *extra):
    res = run_cli("install", *_args(channel, prefix, *extra), env=env)
    assert res.returncode == 0, res.stderr
    (prefix / USER).parent.mkdir(exist_ok=True)
    (prefix / USER).write_text("mine")
    return prefix


def _no_leftovers(prefix):
    """Nothing beside PREFIX but its kept lock file (locks.py: lock files stay, the NFS-safe protocol)."""
    assert sorted(p.name for p in prefix.parent.iterdir()
                  if p.name.startswith(prefix.name + ".") and p.name != prefix.name + ".lorastrap.lock") == []



# --------------------------------------------------------------------------------------------------------------
# Signals held, then honoured

def test_deferred_signals_hold_a_signal_until_the_step_is_done():
    done = []
    with pytest.raises(Interrupted) as info:
        with txn.deferred_signals("after the step"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append("the step finished")
    assert done and "SIGTERM after the step" in info.value.what and info.value.exit_code == 130
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with txn.deferred_signals(swallow=True):  # a run already stopping drops it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            inside = list(seen)
        assert inside == [] and seen == []  # held by the block, then dropped: neither raised nor passed on
        os.kill(os.getpid(), signal.SIGINT)  # the handler from before the block is back
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_signals_at_the_point_of_no_return_never_roll_back(channel, warm_home, tmp_path):
    """SIGINT and SIGTERM while the commit runs (the run pauses 1.5 s just after the "committing" journal): the
    commit finishes, the new environment stays, and the run then says it was stopped (exit 130)."""
    prefix = _installed(channel, tmp_path / "env")
    proc = _start("install", channel, prefix, "--no-verify",
                  env={**CUDA, "LORASTRAP_PAUSE_AT": "commit", "LORASTRAP_PAUSE_S": "1.5"})
    _wait_for(proc, "paused at commit")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "after the commit" in err and "Traceback" not in err
    assert _smoke(prefix)["torch_build"] == "cuda" and (prefix / USER).read_text() == "mine"
    _no_leftovers(prefix)


# --------------------------------------------------------------------------------------------------------------
# The races of repair

def test_repair_waits_for_an_install_in_flight_and_never_touches_its_backup(channel, warm_home, tmp_path):
    prefix = _installed(channel, tmp_path / "env")
    backup = txn.backup_path(prefix)
    inst = _start("install", channel, prefix, "--no-verify",
                  env={**CUDA, "LORASTRAP_PAUSE_AT": "linked", "LORASTRAP_PAUSE_S": "3"})
    _wait_for(inst, "paused at linked")  # the user's environment is now the backup
    rep = _start("repair", channel, prefix, "--yes", "--drop-backup")
    _wait_for(rep, "waiting for another lorastrap run")
    assert (backup / USER).read_text() == "mine" and inst.poll() is None
    _, err = inst.communicate(timeout=120)
    assert inst.returncode == 0, err
    _, err = rep.communicate(timeout=120)
    assert rep.returncode == 0, err
    assert _smoke(prefix)["torch_build"] == "cuda" and (prefix / USER).read_text() == "mine"
    _no_leftovers(prefix)


def test_two_repairs_at_once(channel, warm_home, tmp_path):
    prefix = _installed(channel, tmp_path / "env")
    (prefix / "etc" / "torch.conf").unlink()
    procs = [_start("repair", channel, prefix, "--yes", "--drop-backup") for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert _smoke(prefix)["torch_build"] == "cpu" and (prefix / "etc" / "torch.conf").exists()
    assert (prefix / USER).read_text() == "mine"
    _no_leftovers(prefix)


# --------------------------------------------------------------------------------------------------------------
# Children die with lorastrap

@pytest.fixture
def slow_smoke_envs(tmp_path):
    """The test profiles, with a smoke command that records its pid and then runs for a minute."""
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    doc = yaml.safe_load((envs / "profiles.yaml").read_text())
    for p in doc["profiles"].values():
        p["smoke"] = ["python", "-c", "import os, time; open('smoke.pid', 'w').write(str(os.getpid())); "
                                      "time.sleep(60)"]
    (envs / "profiles.yaml").write_text(yaml.safe_dump(doc))
    return envs


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_the_smoke_child_dies_with_lorastrap(channel, warm_home, tmp_path, slow_smoke_envs, sig):
    prefix = _installed(channel, tmp_path / "env")
    proc = _start("install", channel, prefix, "--no-verify", env=CUDA, envs=slow_smoke_envs)
    pidfile = prefix / "smoke.pid"
    deadline = time.monotonic() + 90
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert alive(child)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert dies_within(child, 10), f"the smoke command outlived lorastrap ({sig.name})"
    if sig != signal.SIGKILL:  # rolled back at once
        assert proc.returncode == 130
        assert _smoke(prefix)["torch_build"] == "cpu" and (prefix / USER).read_text() == "mine"
        _no_leftovers(prefix)


# --------------------------------------------------------------------------------------------------------------
# The package cache that environments share

def test_an_edit_in_place_is_found_and_healed_and_never_reaches_a_new_environment(channel, warm_home, tmp_path):
    prefix = _installed(channel, tmp_path / "env")
    conf = prefix / "share" / "lorastrap-test" / "xz" / "VERSION"  # no prefix placeholder: linked, not copied
    assert conf.stat().st_nlink > 1  # hard-linked to the cache's extracted copy (the default link mode)
    with open(conf, "r+") as f:  # an edit in place, as an editor that does not replace files does it
        f.write("X")
    res = run_cli("doctor", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--json", "--no-imports")
    report = json.loads(res.stdout)
    assert {"altered-files", "cache-shares-edit"} <= {f["code"] for f in report["findings"]}, report
    other = tmp_path / "other"
    res = run_cli("install", *_args(channel, other, "--no-verify"))
    assert res.returncode == 0 and "unpacking it again" in res.stderr, res.stderr
    assert not (other / conf.relative_to(prefix)).read_text().startswith("X")
    res = run_cli("repair", *_args(channel, prefix, "--yes", "--drop-backup"))
    assert res.returncode == 0, res.stderr
    assert not conf.read_text().startswith("X") and (prefix / USER).read_text() == "mine"
    res = run_cli("doctor", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--no-imports")
    assert res.returncode == 0, res.stdout


def test_link_mode_copy_shares_no_file_with_the_cache(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    res = run_cli("install", *_args(channel, prefix, "--no-verify", "--link-mode", "copy"))
    assert res.returncode == 0, res.stderr
    files = [p for p in prefix.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files and all(p.stat().st_nlink == 1 for p in files)
    _smoke(prefix)


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_a_same_size_edit_with_its_mtime_put_back_never_reaches_a_new_environment(channel, warm_home, tmp_path, mode):
    first = _installed(channel, tmp_path / "env")
    assert run_cli("install", *_args(channel, tmp_path / "second", "--no-verify")).returncode == 0  # stamped
    conf = first / "share" / "lorastrap-test" / "xz" / "VERSION"
    st = conf.stat()
    with open(conf, "r+") as f:  # same size, in place, through the shared inode
        f.write("X")
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back: only the ctime tells
    assert conf.stat().st_size == st.st_size and conf.stat().st_mtime_ns == st.st_mtime_ns
    third = tmp_path / "third"
    res = run_cli("install", *_args(channel, third, "--no-verify", "--link-mode", mode))
    assert res.returncode == 0 and "unpacking it again" in res.stderr, res.stderr
    assert not (third / conf.relative_to(first)).read_text().startswith("X")


def test_an_entry_injected_into_an_extracted_copys_paths_json_is_never_linked(channel, warm_home, tmp_path):
    _installed(channel, tmp_path / "env")
    copy = next((warm_home / "pkgs" / "extracted").glob("xz-*"))
    (copy / "share" / "injected.sh").write_text("echo injected\n")
    own = json.loads((copy / "info" / "paths.json").read_text())
    own["paths"].append({"_path": "share/injected.sh", "path_type": "hardlink", "size_in_bytes": 14})
    (copy / "info" / "paths.json").write_text(json.dumps(own))
    other = tmp_path / "other"
    res = run_cli("install", *_args(channel, other, "--no-verify"))
    assert res.returncode == 0 and "unpacking it again" in res.stderr and "share/injected.sh" in res.stderr
    assert not (other / "share" / "injected.sh").exists() and not (copy / "share" / "injected.sh").exists()



def _copies(tmp_path, n: int):
    """N archives (of different sizes) and their extracted copies, each of three files (one empty), as the engine
    unpacks them; a Cache whose inspect answers their entries without opening an archive."""
    import hashlib
    from lorastrap.install import cache
    extracted, archives, info = tmp_path / "extracted", [], {}
    for i in range(n):
        path = tmp_path / "archives" / f"p{i:02d}-1.0-0.conda"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1000 * (i % 5 + 1)))
        copy, entries = extracted / f"p{i:02d}-1.0-0", []
        for j, data in enumerate([b"", os.urandom(100), os.urandom(5000)]):
            (copy / "lib").mkdir(parents=True, exist_ok=True)
            (copy / "lib" / f"f{j}").write_bytes(data)
            entries.append({"_path": f"lib/f{j}", "path_type": "hardlink", "sha256": hashlib.sha256(data).hexdigest()})
        (copy / "info").mkdir()
        (copy / "info" / "paths.json").write_text(json.dumps({"paths": entries}))
        archives.append(path)
        info[path] = {"entries": entries}
    c = cache.Cache(tmp_path / "pkgs")
    c.inspect = info.__getitem__
    return c, archives, extracted


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_damaged_copies_in_several_packages_are_all_removed_and_named_in_order(tmp_path, monkeypatch, cpus):
    """However many threads the check takes (one a CPU, at most four), every damaged copy is removed, the others
    kept, and the copies removed come back sorted (one CPU: they came in the order of the shares, by size)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    c, archives, extracted = _copies(tmp_path, 12)
    damaged = [f"p{i:02d}-1.0-0" for i in (0, 3, 7, 8, 11)]
    for name in damaged:
        (extracted / name / "lib" / "f1").write_bytes(b"X")
    (extracted / damaged[1] / "lib" / "f0").write_bytes(b"Y")  # the empty file, no longer empty
    assert c.check_extracted(archives, full=True, extracted=extracted) == damaged
    left = sorted(p.name for p in extracted.iterdir() if p.is_dir())
    assert left == sorted({f"p{i:02d}-1.0-0" for i in range(12)} - set(damaged))
    assert c.check_extracted(archives, full=False, extracted=extracted) == []  # stamped: the quick check passes
    assert c.check_extracted(archives, full=True, extracted=extracted) == []


def test_the_quick_check_takes_a_moved_link_count_for_a_link_and_a_moved_ctime_alone_for_an_edit(tmp_path, monkeypatch):
    """Every environment made or removed moves the link count and the ctime of each file it links: the quick check
    lets a copy pass when its files kept size, mtime and inode and only their link counts (with their ctimes)
    moved, so removing an environment does not have every copy hashed again.  A ctime that moved since the last
    stamp while the link count did not is an edit: that copy is hashed whole, and removed when it differs."""
    from lorastrap.install import cache
    c, archives, extracted = _copies(tmp_path, 3)
    assert c.check_extracted(archives, full=True, extracted=extracted) == []  # stamped
    hashed = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: hashed.append(path) or real(path))
    files = [f for f in extracted.glob("p0*/lib/f*")]
    env = tmp_path / "env"
    env.mkdir()
    time.sleep(0.01)
    for i, f in enumerate(files):  # an environment made: every file one link more
        os.link(f, env / f"{i}")
    assert c.check_extracted(archives, full=False, extracted=extracted) == [] and hashed == []
    c.restamp_extracted(archives, extracted=extracted)  # what the install does right after linking from them
    shutil.rmtree(env)  # ... and the environment removed
    assert c.check_extracted(archives, full=False, extracted=extracted) == [] and hashed == []
    env.mkdir()
    for i, f in enumerate(files):  # the next install links from them, and stamps them anew
        os.link(f, env / f"{i}")
    c.restamp_extracted(archives, extracted=extracted)
    victim = extracted / "p01-1.0-0" / "lib" / "f2"
    st = victim.stat()
    with open(victim, "r+b") as f:  # the same size, in place; the mtime put back: only the ctime moved
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))  # another byte (an "X" left one in 256 of these random files the same)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert c.check_extracted(archives, full=False, extracted=extracted) == ["p01-1.0-0"] and hashed


def test_a_stamp_that_cannot_be_one_makes_the_check_a_full_one(tmp_path, monkeypatch):
    from lorastrap.install import cache
    c, archives, extracted = _copies(tmp_path, 2)
    assert c.check_extracted(archives, full=True, extracted=extracted) == []
    monkeypatch.setattr(cache, "STAMP_MOST", 1 << 16)
    bad = {"p00-1.0-0": "[" * 100_000, "p01-1.0-0": '{"a": "' + "x" * (1 << 17) + '"}'}  # too deep; too large
    for name, text in bad.items():
        (extracted / name / cache.STAMP).write_text(text)
    assert c.check_extracted(archives, full=False, extracted=extracted) == []  # hashed whole, and stamped
    assert all(json.loads((extracted / name / cache.STAMP).read_text()) for name in bad)
    fifo = extracted / "p00-1.0-0" / cache.STAMP
    fifo.unlink()
    os.mkfifo(fifo)  # a read would block for ever
    import threading
    done = []
    t = threading.Thread(target=lambda: done.append(c.check_extracted(archives, full=False, extracted=extracted)),
                         daemon=True)
    t.start()
    t.join(10)
    assert done == [[]], "the check blocked on a stamp that is a FIFO"


def test_the_copies_the_link_step_unpacked_are_hashed_and_stamped_and_a_wrong_one_fails_the_install(tmp_path):
    """The engine's link step unpacks an archive without checking its sha256 again: right after linking, the copies
    it unpacked (none before the link, not unpacked ahead by the worker) are hashed whole against their archive's
    paths.json as inspected when the archive was checked, and stamped, beside the pip step — a copy whose files
    differ fails the install (EngineError, the transaction rolls back), and the others need no hashing on the next
    install."""
    from lorastrap.install import cache, engines, transaction
    from lorastrap.install.engines import Engine
    c, archives, extracted = _copies(tmp_path, 4)
    checked = {p: c.inspect(p)["entries"] for p in archives}
    eng = Engine("rattler")
    # p00: there before (stamped by an earlier check); p01: unpacked ahead by the worker (fresh); p02, p03: by the
    # link step, p03 wrongly.
    assert c.check_extracted(archives[:1], full=True, extracted=extracted) == []
    transaction._restamp(c, eng, archives, extracted, frozenset({"p01-1.0-0"}), archives[1:], checked)
    assert all((extracted / f"p{i:02d}-1.0-0" / cache.STAMP).is_file() for i in range(4))
    assert c.check_extracted(archives, full=False, extracted=extracted) == []  # the quick check passes for all
    (extracted / "p03-1.0-0" / cache.STAMP).unlink()
    (extracted / "p03-1.0-0" / "lib" / "f2").write_bytes(b"not what the archive holds")
    with pytest.raises(engines.EngineError, match="p03-1.0-0") as err:
        transaction._restamp(c, eng, archives, extracted, frozenset(), archives[3:], checked)
    assert transaction.RESTORED in err.value.fix
    assert not (extracted / "p03-1.0-0").exists()  # removed: the next install unpacks it again
    assert (extracted / "p02-1.0-0" / cache.STAMP).is_file()


def test_an_archive_replaced_after_its_check_cannot_vouch_for_its_own_copy(tmp_path):
    """The archive changed between its sha256 check and the engine's read (another file added, listed in its own
    paths.json): the copy the link step unpacked from it is held against the paths.json inspected at the check,
    not against the archive as it is now, and fails."""
    from lorastrap.install import engines, transaction
    from lorastrap.install.engines import Engine
    c, archives, extracted = _copies(tmp_path, 2)
    checked = {p: list(c.inspect(p)["entries"]) for p in archives}
    copy = extracted / "p01-1.0-0"
    (copy / "lib" / "extra").write_bytes(b"x")
    swapped = checked[archives[1]] + [{"_path": "lib/extra", "path_type": "hardlink",
                                       "sha256": hashlib.sha256(b"x").hexdigest()}]
    (copy / "info" / "paths.json").write_text(json.dumps({"paths": swapped}))
    c.inspect = {archives[0]: {"entries": checked[archives[0]]}, archives[1]: {"entries": swapped}}.__getitem__
    with pytest.raises(engines.EngineError, match="p01-1.0-0"):
        transaction._restamp(c, Engine("rattler"), archives, extracted, frozenset(), archives, checked)


def test_the_check_after_the_link_waits_for_a_cache_another_installer_holds(tmp_path):
    """With micromamba, another installer may hold its package cache right after this one's link: the plain
    restamp is skipped then (a hint), the check of the copies the link step unpacked is not — it waits."""
    import threading
    from lorastrap.install import engines, transaction
    from lorastrap.install.engines import Engine
    c, archives, extracted = _copies(tmp_path, 2)
    checked = {p: c.inspect(p)["entries"] for p in archives}
    eng = Engine("micromamba", "/nonexistent/micromamba", "1.5.12")
    (extracted / "p01-1.0-0" / "lib" / "f2").write_bytes(b"damaged")
    got = []

    def restamp():
        try:
            transaction._restamp(c, eng, archives, extracted, frozenset(), archives, checked)
            got.append("passed")
        except engines.EngineError as exc:
            got.append(str(exc))
    with engines.engine_cache_held(eng, c.root / "extracted"):
        t = threading.Thread(target=restamp, daemon=True)
        t.start()
        t.join(1.0)
        assert t.is_alive() and got == []  # waiting for the other installer
    t.join(30)
    assert len(got) == 1 and "p01-1.0-0" in got[0], got


def test_after_a_cold_install_every_copy_it_linked_from_is_stamped(channel, home, tmp_path):
    """Whichever unpacked them (the worker ahead, or the link step when the link request came first), every copy a
    cold install linked from carries a stamp afterwards: the next install's quick check hashes none of them."""
    from lorastrap.install import cache
    res = run_cli("install", *_args(channel, tmp_path / "env"), "--no-verify", "--engine", "rattler")
    assert res.returncode == 0, res.stderr[-2000:]
    copies = [d for d in (home / "pkgs" / "extracted").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(copies) >= 39, copies
    assert sorted(d.name for d in copies if not (d / cache.STAMP).is_file()) == []


# --------------------------------------------------------------------------------------------------------------
# doctor while a transaction runs, after one died, and on a lock that lacks a dependency

def _doctor(prefix, *extra):
    res = run_cli("doctor", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--json", "--no-imports", *extra)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_doctor_during_a_transaction_and_after_it_died(channel, warm_home, tmp_path):
    prefix = _installed(channel, tmp_path / "env")
    proc = _start("install", channel, prefix, "--no-verify", env={**CUDA, "LORASTRAP_PAUSE_AT": "aside"})
    _wait_for(proc, "paused at aside")  # PREFIX is aside (the backup), the new one not yet linked
    rc, report = _doctor(prefix)
    assert rc == 8 and report["verdict"] == "busy", report
    assert "is changing" in report["findings"][0]["what"] and ".lorastrap-backup" in report["findings"][0]["what"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not prefix.exists()  # died with the environment aside
    rc, report = _doctor(prefix)
    assert rc == 11 and report["findings"][0]["code"] == "interrupted-transaction", report
    assert str(txn.backup_path(prefix)) in report["findings"][0]["what"]
    res = run_cli("repair", *_args(channel, prefix, "--yes", "--drop-backup"))
    assert res.returncode == 0, res.stderr
    assert _smoke(prefix)["torch_build"] == "cpu" and (prefix / USER).read_text() == "mine"
    _no_leftovers(prefix)


def test_a_lock_lacking_a_dependency_is_refused_and_named_by_doctor(channel, warm_home, tmp_path):
    prefix = _installed(channel, tmp_path / "env")
    own = prefix / "conda-meta" / "lorastrap" / "conda-lock.yml"
    doc = yaml.safe_load(own.read_text())
    doc["package"] = [p for p in doc["package"] if p["name"] != "libzlib"]  # others depend on it
    own.write_text(yaml.safe_dump(doc))
    rc, report = _doctor(prefix)
    assert "lock-incomplete" in {f["code"] for f in report["findings"]} and rc == 12, report
    local = warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml"  # the lock made here for the test channel
    local.write_text(yaml.safe_dump({**yaml.safe_load(local.read_text()), "package": doc["package"]}))
    res = run_cli("install", *_args(channel, tmp_path / "third", "--no-verify"))
    assert res.returncode == 4 and "libzlib" in res.stderr and "Re-lock" in res.stderr, res.stderr
    assert not (tmp_path / "third").exists()


def test_what_killed_runs_left_is_removed_by_the_next_run_only_when_its_owner_is_dead(channel, warm_home, tmp_path):
    import socket
    prefix = _installed(channel, tmp_path / "env")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    host = socket.gethostname()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    pkgs = warm_home / "pkgs"
    stale = [pkgs / f".lorastrap-install-{host}.{dead.pid}.x1", tmpdir / f"lorastrap-repair-{host}.{dead.pid}.x2"]
    kept = [pkgs / f".lorastrap-install-{host}.{os.getpid()}.x3",  # its owner runs
            pkgs / f".lorastrap-install-another-node.{dead.pid}.x4",  # another node's, on a shared cache
            tmpdir / f"lorastrap-repair-another-node.{dead.pid}.x5"]
    for d in stale + kept:
        d.mkdir()
        (d / "f").write_text("x")
    copy = next((pkgs / "extracted").glob("xz-*"))
    half = copy / f"..lorastrap-checked.{dead.pid}.tmp"  # a stamp write cut by SIGKILL
    half.write_text("{")
    (prefix / "share" / "lorastrap-test" / "xz" / "VERSION").write_text("edited")  # so repair has work
    res = run_cli("repair", *_args(channel, prefix, "--yes", "--drop-backup"), env={"TMPDIR": str(tmpdir)})
    assert res.returncode == 0, res.stderr
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)
    assert not half.exists()
    assert not list(pkgs.glob(f".lorastrap-install-{host}.{os.getpid() + 0}x*"))
    assert not [p for p in tmpdir.iterdir() if p.name.startswith(f"lorastrap-repair-{host}.") and p not in kept]
