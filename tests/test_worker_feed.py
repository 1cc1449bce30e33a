"""The engine worker's feeder (subproc.Worker.send/_fed/ask/discard): timeouts, interrupts, leaks."""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lorastrap.install import ahead, engines


def _feeders():
    return [t for t in threading.enumerate() if t.name == "lorastrap-worker-feed" and t.is_alive()]


def _fill(worker, tmp_path, n=1000):
    """~300 KiB of extract requests against a 64 KiB pipe: the feeder blocks once the worker stops reading."""
    for i in range(n):
        d = f"pkg{i:04d}-1.0-h0_0"
        worker.send({"op": "extract", "archive": str(tmp_path / "missing" / f"{d}.conda"), "dist": d,
                     "sha256": "0" * 64, "cache_dir": str(tmp_path / "cache")})


def _children() -> list[int]:
    """This process's children still running (not zombies)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(os.getpid()) and fields[0] != "Z":
            found.append(int(pid))
    return found


def _closed(worker):
    return all(p is None or p.closed for p in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr))


def test_ask_honours_its_timeout_when_the_worker_reads_nothing(tmp_path):
    """A worker that hangs (stopped here; a hung import or an extract that never returns holds it the same way)
    with more queued than its pipe holds: ask(timeout=3) must come back, timed out, not wait forever."""
    from lorastrap.core import subproc
    worker = subproc.Worker("locking.rattler_worker")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    answer = {}
    try:
        _fill(worker, tmp_path)
        asking = threading.Thread(target=lambda: answer.update(worker.ask({"op": "index", "channel": "x"},
                                                                          timeout=3)), daemon=True)
        asking.start()
        asking.join(timeout=30)
        assert not asking.is_alive(), "ask(timeout=3) still waiting after 30 s"
        assert answer.get("timed_out"), answer
    finally:
        if worker.proc.poll() is None:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()


def test_an_interrupt_while_the_last_requests_are_written_ends_the_worker(tmp_path):
    """Ctrl-C (or SIGTERM made an exception) while ask() waits for the feeder: the worker goes too, as it does
    when the interrupt comes while ask waits for the answer."""
    from lorastrap.core import subproc
    worker = subproc.Worker("locking.rattler_worker")
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        _fill(worker, tmp_path)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            worker.ask({"op": "index", "channel": "x"}, timeout=60)
        timer.join()
        assert worker.proc.poll() is not None, "the worker outlived the interrupted ask()"
    finally:
        if worker.proc.poll() is None:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()


def test_a_dead_worker_replaced_at_the_link_step_leaves_no_thread_or_pipe(warm_home, tmp_path):
    """The worker started ahead was sent work and then died: link() starts a fresh one.  The dead one's feeder
    thread and its three pipes must not outlive the install (a library caller runs many installs in one process)."""
    from lorastrap.core import subproc
    from lorastrap.install.cache import dist_name
    from test_engines import _handed_over
    conda, archives, lock = _handed_over(warm_home, tmp_path)
    before_threads = len(_feeders())
    dead = subproc.Worker("locking.rattler_worker")
    e = conda[0]
    assert dead.send({"op": "extract", "archive": str(archives[e.name]), "dist": dist_name(archives[e.name].name),
                      "sha256": e.sha256, "cache_dir": str(tmp_path / "cache")})
    time.sleep(0.5)  # the line is written; the feeder waits for the next one
    os.killpg(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    ahead.WORKERS.append(dead)
    try:
        engines.link(engines.Engine("rattler"), prefix=tmp_path / "env", lock_file=lock, platform="linux-64",
                     cache_dir=tmp_path / "cache")
    finally:
        ahead.WORKERS.clear()
    time.sleep(0.5)
    assert len(_feeders()) == before_threads, "the dead worker's feeder thread is still waiting for lines"
    assert _closed(dead), "the dead worker's pipes are still open"


def test_discarding_a_worker_that_exited_already_leaves_no_thread_or_pipe(tmp_path):
    """discard() of a worker that was sent work and has died meanwhile (a crash in py-rattler): nothing of it
    is left in this process."""
    from lorastrap.core import subproc
    before_threads = len(_feeders())
    worker = subproc.Worker("locking.rattler_worker")
    _fill(worker, tmp_path, n=1)
    time.sleep(0.5)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    worker.discard(wait=False)
    time.sleep(0.5)
    assert len(_feeders()) == before_threads, "the feeder thread is still waiting for lines"
    assert _closed(worker), "its pipes are still open"


def test_many_installs_in_one_process_leave_no_descriptor_or_thread(channel, session_state, tmp_path, monkeypatch):
    """A library caller running cold installs one after another (each archive handed to the worker ahead):
    the descriptors and threads of this process come back to what they were."""
    import shutil

    from lorastrap import cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")
    monkeypatch.delenv("LORASTRAP_PKGS_DIR", raising=False)
    from lorastrap.core import subproc
    sent = []
    real_send = subproc.Worker.send
    monkeypatch.setattr(subproc.Worker, "send", lambda self, req: sent.append(req) or real_send(self, req))
    counts = []
    for i in range(4):
        home = tmp_path / f"home{i}"
        shutil.copytree(session_state / "locks", home / "locks")
        shutil.copytree(session_state / "pkgs" / "archives", home / "pkgs" / "archives", copy_function=os.link)
        monkeypatch.setenv("LORASTRAP_HOME", str(home))
        rc = cli.main(["install", "--envs-dir", os.path.join(root, "tests", "envs"), "--channel", channel["url"],
                       "--pip-index-url", channel["simple"], "--prefix", str(tmp_path / f"env{i}"),
                       "--engine", "rattler", "--no-verify", "--json"])
        assert rc == 0
        time.sleep(0.3)
        counts.append((len(os.listdir("/proc/self/fd")), threading.active_count(), len(_feeders())))
    assert len(sent) >= 4 and counts[-1] == counts[1], (len(sent), counts)


def test_a_request_sent_once_the_answered_one_is_on_its_way_is_refused_not_dropped(tmp_path):
    """send() while ask() is under way (from another thread): either it is carried out (in the answer) or send
    says False — never True for a line no one writes."""
    from lorastrap.core import subproc
    worker = subproc.Worker("locking.rattler_worker")
    _fill(worker, tmp_path, n=1)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(worker.ask({"op": "index", "channel": "x"}, timeout=60)))
    asking.start()
    time.sleep(1)
    late = worker.send({"op": "extract", "archive": str(tmp_path / "late.conda"), "dist": "late-1.0-h0_0",
                        "sha256": "0" * 64, "cache_dir": str(tmp_path / "cache")})
    os.kill(worker.proc.pid, signal.SIGCONT)
    asking.join(timeout=60)
    assert not late or "late-1.0-h0_0" in answer.get("extracted", {}), (late, answer.get("extracted"))


def _checked(archive):
    """ARCHIVE as the package cache leaves a checked one: its .verified marker holds its stats (cache._mark)."""
    from lorastrap.install import cache
    archive.with_name(f".{archive.name}.verified").write_text(cache.signature(archive.stat()))
    import hashlib
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def test_big_archives_are_unpacked_ahead_each_in_a_thread_of_its_own(channel, home, tmp_path, monkeypatch):
    """An archive over UNPACK_MAX is not queued behind the small ones: it is unpacked as soon as it is checked, in a
    thread of this process (at most BIG_MOST at once; past that the link step unpacks it), and the link step
    collects what they unpacked — rattler's own cache entries (the folder and its metadata file, naming the
    archive's sha256)."""
    import shutil
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)  # every archive is a big one here
    monkeypatch.setattr(ahead, "BIG_MOST", 2)
    (tmp_path / "archives").mkdir()
    archives = [Path(shutil.copy2(a, tmp_path / "archives"))
                for a in sorted((channel["dir"] / "linux-64").glob("*.conda"))[:3]]
    cache = tmp_path / "extracted"
    ahead.WORKERS.append(subproc.Worker("install.worker"))  # what `lorastrap install` starts first
    try:
        sha = {a: _checked(a) for a in archives}
        handed = [ahead.unpack(a, sha[a], cache) for a in archives]
        assert handed == [True, True, False] and len(ahead.BIG) == 2  # the third: left to the link step
        done = ahead.collect(timeout=120)
        assert ahead.BIG == []
        for a in archives[:2]:
            dist = a.name[:-len(".conda")]
            assert done[dist] == "ok", done
            assert (cache / dist / "info" / "paths.json").is_file()
            assert (cache / f"{dist}.lock").read_bytes()[8:].hex() == sha[a]
        assert not (cache / archives[2].name[:-len(".conda")]).exists()
        assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [".cache.lock"]  # nothing left
    finally:
        ahead.discard()
    assert ahead.WORKERS == [] and ahead.BIG == []


def test_a_big_archive_changed_after_its_check_is_not_unpacked_ahead(channel, tmp_path, monkeypatch):
    """The archive is written to after its sha256 matched (its ctime moves): its unpacking ahead says so and
    enters nothing — the link step unpacks it, after the cache has checked it again."""
    import shutil
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)
    archive = Path(shutil.copy2(sorted((channel["dir"] / "linux-64").glob("*.conda"))[0], tmp_path))
    cache = tmp_path / "extracted"
    sha = _checked(archive)
    with open(archive, "r+b") as f:  # the same bytes written again: only the ctime says so
        f.write(f.read(16))
    ahead.WORKERS.append(subproc.Worker("install.worker"))
    try:
        assert ahead.unpack(archive, sha, cache)
        dist = archive.name[:-len(".conda")]
        assert ahead.collect(timeout=120) == {dist: "the archive changed after it was checked"}
        assert [p.name for p in cache.iterdir()] == []  # no entry, no folder left half filled
    finally:
        ahead.discard()


def test_the_install_worker_unpacks_each_conda_itself_before_it_answers(channel, tmp_path):
    """The worker `lorastrap install` starts ahead (install/worker.py) unpacks every .conda it is sent with
    lorastrap's own unpacker, several at once, and all of them before it answers — none is "left" to the link step,
    even those sent right before the answered request — each as py-rattler's extract lays it out.  The unpacker
    is lorastrap's, not py-rattler's: an archive written to after its check (the same bytes again: its ctime
    moved) is refused, which py-rattler's extract (its sha256 of the same bytes matches) would have taken.  An
    archive sent twice is unpacked once (two threads writing one folder could enter it half removed)."""
    import shutil
    from conftest import rattler_extract, unpacked_tree
    from lorastrap.core import subproc
    (tmp_path / "archives").mkdir()
    archives = [Path(shutil.copy2(a, tmp_path / "archives")) for a in sorted((channel["dir"] / "linux-64").glob("*.conda"))]
    assert len(archives) >= 4
    sha = {a: _checked(a) for a in archives}
    changed = archives[-1]
    with open(changed, "r+b") as f:
        f.write(f.read(16))
    cache = tmp_path / "extracted"
    worker = subproc.Worker("install.worker")
    try:
        for a in archives + archives[:2]:  # two sent twice: unpacked once each
            assert worker.send({"op": "extract", "archive": str(a), "dist": a.name[:-len(".conda")],
                                "sha256": sha[a], "cache_dir": str(cache)})
        answer = worker.ask({"op": "index", "channel": str(tmp_path / "no-channel")}, timeout=120)
    finally:
        worker.discard()
    dists = {a: a.name[:-len(".conda")] for a in archives}
    assert answer.get("extracted") == {**{dists[a]: "ok" for a in archives[:-1]},
                                       dists[changed]: "the archive changed after it was checked"}, answer
    assert not (cache / dists[changed]).exists()
    rattler_extract({tmp_path / "theirs" / dists[a]: a for a in archives[:-1]})
    for a in archives[:-1]:
        assert (cache / f"{dists[a]}.lock").read_bytes()[8:].hex() == sha[a]
        assert unpacked_tree(cache / dists[a]) == unpacked_tree(tmp_path / "theirs" / dists[a]), a.name
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [".cache.lock"]  # nothing half made


def _incompressible(tmp_path: Path) -> Path:
    """A .conda with a member of 48 MiB of incompressible data: still being unpacked a while after it began."""
    import random
    import tarfile
    import testchannel
    outside = tmp_path / "outside"
    outside.mkdir()
    a = testchannel.hostile(tmp_path / "big", "inner-link", outside)
    m = tarfile.TarInfo("lib/big.bin")
    data = random.Random(7).randbytes(48 << 20)
    m.size, m.mode = len(data), 0o644
    testchannel._with_members(a, [(m, data)])
    return a


def test_the_install_worker_left_by_its_parent_stops_unpacking_and_leaves_nothing(tmp_path):
    """The install's process dies while the worker unpacks (its stdin ends, no answered request came): the
    unpacking stops within a block, what it had unpacked is removed, and the worker leaves — an archive of 48 MiB
    of incompressible data, so it is still being unpacked when stdin closes."""
    from lorastrap.core import subproc
    a = _incompressible(tmp_path)
    sha = _checked(a)
    cache = tmp_path / "extracted"
    worker = subproc.Worker("install.worker")
    try:
        assert worker.send({"op": "extract", "archive": str(a), "dist": "x-1.0-h0_0", "sha256": sha,
                            "cache_dir": str(cache)})
        deadline = time.monotonic() + 60
        while not (cache.is_dir() and any(p.name.startswith(".x-1.0-h0_0") for p in cache.iterdir())):
            assert time.monotonic() < deadline, "the worker never began to unpack"
            time.sleep(0.005)
        worker.proc.stdin.close()  # as when the install's process is gone: its end of the pipe closes
        assert worker.proc.wait(timeout=60) == 0
    finally:
        worker.discard()
    assert sorted(p.name for p in cache.iterdir()) in ([".cache.lock"], []), list(cache.iterdir())


def test_an_unpacker_thread_that_cannot_start_leaves_no_unpacking_behind(channel, tmp_path, monkeypatch):
    """A thread limit refuses the install worker's first unpacking thread: the pool had queued that archive all the
    same, and a thread started for the next one would have unpacked it untracked — past the answer, beside the
    link step's own.  Now the pool is dropped (what it had not begun, cancelled): the archive is unpacked by no one
    here, and the later ones as usual."""
    import shutil
    from lorastrap.install import worker
    big = _incompressible(tmp_path)
    (tmp_path / "archives").mkdir()
    small = [Path(shutil.copy2(a, tmp_path / "archives"))
             for a in sorted((channel["dir"] / "linux-64").glob("*.conda"))[:2]]
    cache = tmp_path / "extracted"
    real_start, refused = threading.Thread.start, []

    def start(thread):
        if thread.name.startswith("lorastrap-unpack") and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    unpackers = worker.Unpackers()
    with pytest.raises(RuntimeError):
        unpackers.take({"archive": str(big), "dist": "big-1.0-h0_0", "sha256": _checked(big), "cache_dir": str(cache)})
    for a in small:
        assert unpackers.take({"archive": str(a), "dist": a.name[:-len(".conda")], "sha256": _checked(a),
                               "cache_dir": str(cache)})
    assert unpackers.results() == {a.name[:-len(".conda")]: "ok" for a in small}
    unpackers.pool.shutdown(wait=True)  # every thread it ever started has ended: whatever they ran is done
    assert refused and not (cache / "big-1.0-h0_0").exists()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".big")]


def test_halting_the_install_worker_does_not_begin_what_is_queued(tmp_path):
    """Its stdin ends with many archives queued: the ones being unpacked stop within a block, the others are not
    begun at all (each would have opened its archive and made its folder only to stop and remove it)."""
    from lorastrap.install import worker
    big = _incompressible(tmp_path)
    sha = _checked(big)
    cache = tmp_path / "extracted"
    unpackers = worker.Unpackers()
    for i in range(30):
        assert unpackers.take({"archive": str(big), "dist": f"big{i}-1.0-h0_0", "sha256": sha, "cache_dir": str(cache)})
    unpackers.halt()
    how = unpackers.results()
    assert sum(why.startswith("CancelledError") for why in how.values()) >= 30 - worker.UNPACKERS, how
    assert set(how.values()) <= {"stopped", "ok", "CancelledError: "}, how
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith("big")) in ([".cache.lock"], []), \
        list(cache.iterdir())


@pytest.mark.slow
def test_a_worker_killed_at_a_random_moment_leaves_no_record_half_written(channel, tmp_path):
    """SIGKILL at a random moment (what discard does to a worker it sent work to) while the install worker enters
    many packages: a package's metadata file (DIST.lock: revision and sha256, 40 bytes) is whole or not there — it
    was written in place after the folder's rename, and a kill between the two left it empty (4 of 40 kills)."""
    import json
    import random
    import shutil
    from lorastrap.core import subproc
    (tmp_path / "archives").mkdir()
    small = sorted((Path(shutil.copy2(a, tmp_path / "archives"))
                    for a in sorted((channel["dir"] / "linux-64").glob("*.conda"))), key=lambda a: a.stat().st_size)[:6]
    sha = {a: _checked(a) for a in small}
    rnd, short = random.Random(), []
    for trial in range(40):
        cache = tmp_path / f"c{trial}"
        argv, env = subproc.own_python("install.worker")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, text=True)
        for i in range(200):
            a = small[i % len(small)]
            proc.stdin.write(json.dumps({"op": "extract", "archive": str(a), "dist": f"d{i}-{a.name[:-6]}",
                                         "sha256": sha[a], "cache_dir": str(cache)}) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not cache.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        proc.stdin.close()
        short += [(trial, r.name, r.stat().st_size) for r in cache.glob("*.lock")
                  if not r.name.startswith(".") and r.stat().st_size != 40]
        shutil.rmtree(cache)
    assert short == []


def _dist(a: Path) -> str:
    return f"{a.parent.name}.{a.name[:-len('.conda')]}"  # one test channel has an archive of one name per platform


def test_own_unpacking_lays_out_what_rattlers_extract_does(channel, tmp_path):
    """lorastrap's own unpacker (big archives, archive.unpack) against py-rattler's extract, the engine's own, on
    every archive of the test channel and on one with unusual members (a group-writable file, a setuid one, a hard
    link, a 775 folder, a foreign owner): the same tree, bit for bit, but for symbolic links' own mtimes (the link
    step makes links anew)."""
    import hashlib
    import testchannel
    from conftest import rattler_extract, unpacked_tree
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    outside = tmp_path / "outside"
    outside.mkdir()
    archives = sorted(channel["dir"].glob("*/*.conda")) + [testchannel.hostile(tmp_path / "odd", kind, outside)
                                                              for kind in ("modes", "inner-link")]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    sha = {a: hashlib.sha256(a.read_bytes()).hexdigest() for a in archives}
    rattler_extract({theirs / _dist(a): a for a in archives})
    for a in archives:
        unpacked = enter(ours, _dist(a), sha[a], lambda folder: archive.unpack(a, folder, unchanged=lambda st: True))
        assert unpacked == "ok", unpacked
    assert sorted(p.name for p in ours.iterdir() if p.is_dir()) == sorted(p.name for p in theirs.iterdir())
    for a in archives:
        mine, rattlers = unpacked_tree(ours / _dist(a)), unpacked_tree(theirs / _dist(a))
        assert mine == rattlers, (a.name, {k: (mine.get(k), rattlers.get(k)) for k in set(mine) | set(rattlers)
                                            if mine.get(k) != rattlers.get(k)})
    odd = unpacked_tree(ours / "linux-64.hostile-modes-1.0-h0_0")
    assert odd["share/odd/shared.txt"][1] == "0o664" and odd["share/odd/suid.sh"][1] == "0o755"  # as rattler's
    assert odd["share/odd/again.txt"][6] == odd["share/odd/shared.txt"][6]  # one file, two names
    assert (ours / "linux-64.hostile-modes-1.0-h0_0" / "share/odd/shared.txt").stat().st_uid == os.getuid()


@pytest.mark.parametrize("kind", ["tar-traversal", "symlink-out", "fifo"])
def test_own_unpacking_refuses_what_inspect_refuses(tmp_path, kind):
    """Containment is inspect's, before anything is unpacked; the unpacker refuses the same members again by
    itself (by name, and by the links it has made): nothing lands outside, and what it unpacked is removed."""
    import testchannel
    from lorastrap.core.errors import UnsafePackageError
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    outside = tmp_path / "outside"
    outside.mkdir()
    a = testchannel.hostile(tmp_path / "hostile", kind, outside)
    with pytest.raises(UnsafePackageError):
        archive.inspect(a)
    cache = tmp_path / "extracted"
    with pytest.raises(UnsafePackageError):
        enter(cache, "x-1.0-h0_0", "0" * 64, lambda folder: archive.unpack(a, folder, unchanged=lambda st: True))
    assert list(outside.iterdir()) == [] and [p.name for p in cache.iterdir()] == []


def _members(outside, case):
    """Tar members that use a link the package makes to reach OUTSIDE, in ways inspect's names alone do not show
    (each found by an adversarial review of the unpacker; py-rattler's extract refuses or skips every one)."""
    import tarfile
    import testchannel
    link = lambda name, to: testchannel._member(name, link=to)  # noqa: E731
    file = lambda name, data=b"pwned\n": testchannel._member(name, data)  # noqa: E731

    def kind(member, type_, linkname="", mode=None):
        member[0].type, member[0].linkname = type_, linkname
        if mode is not None:
            member[0].mode = mode
        return member
    (outside / "dir").mkdir()
    (outside / "dir" / "secret.txt").write_text("original\n")
    return {"hard link through a link, then its name written":
            [link("a", str(outside / "dir")), kind(file("x", b""), tarfile.LNKTYPE, "a/secret.txt"), file("x")],
            "a folder member named as a link": [link("d", str(outside / "dir")),
                                                kind(file("d", b""), tarfile.DIRTYPE, mode=0o777)],
            "a hard link to a link, then a file below it": [link("s", str(outside / "dir")),
                                                           kind(file("h", b""), tarfile.LNKTYPE, "s"),
                                                           file("h/pwned.txt")],
            "a folder member named LINK/.": [link("s", str(outside / "dir")),
                                             kind(file("s/.", b""), tarfile.DIRTYPE, mode=0o707)],
            "LINK/..": [link("d", str(outside / "dir")), file("d/../pwned.txt"),
                        kind(file("d/../newdir", b""), tarfile.DIRTYPE)]}[case]


@pytest.mark.parametrize("case", ["hard link through a link, then its name written", "a folder member named as a link",
                                  "a hard link to a link, then a file below it", "a folder member named LINK/.",
                                  "LINK/.."])
def test_own_unpacking_never_writes_through_a_link(tmp_path, case):
    """Whatever the names say: nothing is written, made or changed outside the unpacked folder — every path is
    walked from the folder's own descriptor without following a link — and the archive is refused (the engine at
    the link step unpacks it, and refuses it too); nothing is left in the cache."""
    import stat
    import testchannel
    from lorastrap.core.errors import LorastrapError
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    outside = tmp_path / "outside"
    outside.mkdir()
    a = testchannel.hostile(tmp_path / "pkg", "inner-link", outside)
    testchannel._with_members(a, _members(outside, case))

    def state():
        return sorted((str(p.relative_to(outside)), stat.S_IMODE(p.lstat().st_mode), p.read_bytes() if p.is_file()
                       else None) for p in [outside, *outside.rglob("*")])
    before = state()
    cache = tmp_path / "extracted"
    with pytest.raises(LorastrapError):
        enter(cache, "x-1.0-h0_0", "0" * 64, lambda folder: archive.unpack(a, folder, unchanged=lambda st: True))
    assert state() == before and [p.name for p in cache.iterdir()] == []


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_own_unpacking_leaves_a_sparse_file_to_the_engine(tmp_path, fmt):
    """A sparse member (GNU tar's own --sparse, in its two formats) is refused, not written with the bytes of its
    data area as if they were the file's: the engine at the link step unpacks it (py-rattler expands it)."""
    import shutil
    import subprocess
    import zipfile

    import zstandard
    import testchannel
    from lorastrap.core.errors import IntegrityError
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    if shutil.which("tar") is None:
        pytest.skip("no tar")
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    with open(src / "lib" / "sparse.bin", "wb") as f:
        f.write(b"HEAD" * 1000)
        f.seek(3 << 20)
        f.write(b"TAIL" * 1000)
    raw = subprocess.run(["tar", "-C", str(src), f"--format={fmt}", "--sparse", "-cf", "-", "lib/sparse.bin"],
                         capture_output=True, check=True).stdout
    a = testchannel.hostile(tmp_path / "pkg", "inner-link", tmp_path)
    with zipfile.ZipFile(a) as z:
        blobs = {i.filename: z.read(i) for i in z.infolist()}
    pkg = next(n for n in blobs if n.startswith("pkg-"))
    blobs[pkg] = zstandard.ZstdCompressor().compress(raw)
    with zipfile.ZipFile(a, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in blobs.items():
            z.writestr(name, data)
    cache = tmp_path / "extracted"
    with pytest.raises(IntegrityError, match="cannot be unpacked"):
        enter(cache, "x-1.0-h0_0", "0" * 64, lambda folder: archive.unpack(a, folder, unchanged=lambda st: True))
    assert [p.name for p in cache.iterdir()] == []


def test_own_unpacking_refuses_a_member_folders_deeper_than_any_package(tmp_path):
    """A member 200 folders down is refused before anything is made for it (each level holds a descriptor while
    its bytes are written, and Python 3.11's shutil.rmtree cannot remove a tree 1,000 deep): the engine unpacks it."""
    import testchannel
    from lorastrap.core.errors import IntegrityError
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    a = testchannel.hostile(tmp_path / "pkg", "inner-link", tmp_path)
    testchannel._with_members(a, [testchannel._member("/".join(["d"] * 200) + "/f", b"deep\n")])
    cache = tmp_path / "extracted"
    with pytest.raises(IntegrityError) as refused:
        enter(cache, "x-1.0-h0_0", "0" * 64, lambda folder: archive.unpack(a, folder, unchanged=lambda st: True))
    assert "is 201 folders deep" in refused.value.why and [p.name for p in cache.iterdir()] == []


def test_own_unpacking_stops_within_a_block_and_leaves_nothing(tmp_path):
    """An unpacking told to stop (an interrupt, another archive's failure) ends at its next read and removes what
    it had unpacked: an archive of 48 MiB of incompressible data, stopped after its first blocks."""
    from lorastrap.install import archive
    from lorastrap.locking.rattler_worker import enter
    a = _incompressible(tmp_path)
    reads = []

    def stopped() -> bool:
        reads.append(1)
        return len(reads) > 3
    cache = tmp_path / "extracted"
    with pytest.raises(archive.Stopped):
        enter(cache, "x-1.0-h0_0", "0" * 64, lambda folder: archive.unpack(a, folder, unchanged=lambda st: True,
                                                                           stopped=stopped))
    assert len(reads) == 4 and [p.name for p in cache.iterdir()] == []


@pytest.mark.slow
def test_a_cold_install_unpacks_a_big_archive_ahead_and_needs_no_check_after_the_link(home, tmp_path):
    """A channel with one archive over UNPACK_MAX (numpy, 70 MiB incompressible): a cold install unpacks it in a
    thread of its own as soon as it is checked, links from that copy (unpacked from the archive whose stats are
    still those it had when its sha256 matched), and every copy carries a stamp afterwards."""
    import subprocess
    import sys
    import testchannel
    from conftest import ROOT, run_cli
    from lorastrap.install import cache
    out = tmp_path / "tc"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(out)], check=True,
                   capture_output=True, timeout=600, env=dict(os.environ, LORASTRAP_TESTCHANNEL_BIG="numpy=70"))
    server, url = testchannel.serve(out)
    try:
        res = run_cli("install", "--envs-dir", str(ROOT / "tests" / "envs"), "--channel", f"{url}/channel",
                      "--pip-index-url", f"{url}/simple", "--prefix", str(tmp_path / "env"), "--engine", "rattler",
                      "--no-verify", timeout=600)
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unpacked ahead, each in a thread of its own: numpy-" in res.stderr, res.stderr[-3000:]
    copies = [d for d in (home / "pkgs" / "extracted").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert sorted(d.name for d in copies if not (d / cache.STAMP).is_file()) == []


def test_an_interrupt_while_the_link_step_waits_for_a_big_archive_leaves_nothing_running(channel, tmp_path,
                                                                                         monkeypatch):
    """Ctrl-C while the link step waits for a big archive being unpacked: the worker started ahead is still the
    install's to let go (it is taken only after), so discard() ends it, and the unpacking stops at its next block
    and removes what it had unpacked — nothing is left running or half made for a library caller."""
    import shutil
    from lorastrap.core import subproc
    from lorastrap.install import archive
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)
    real, reading = archive.unpack, threading.Event()

    def unhurried(path, dest, *, unchanged, stopped):  # the real unpacker, still reading when the link step comes
        def later() -> bool:
            reading.set()
            while not stopped():
                time.sleep(0.01)
            return True
        return real(path, dest, unchanged=unchanged, stopped=later)
    monkeypatch.setattr(archive, "unpack", unhurried)
    one = Path(shutil.copy2(sorted((channel["dir"] / "linux-64").glob("*.conda"))[0], tmp_path))
    cache = tmp_path / "extracted"
    started = subproc.Worker("install.worker")
    ahead.WORKERS.append(started)
    try:
        assert ahead.unpack(one, _checked(one), cache)
        future = ahead.BIG[0][1]
        assert reading.wait(30)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            engines.link(engines.Engine("rattler"), prefix=tmp_path / "env", lock_file=tmp_path / "x-lock.yml",
                         platform="linux-64", cache_dir=cache)
        ahead.discard(wait=False)  # what cli/install.py's finally does, right before the CLI's os._exit
        assert future.done() and future.result() == "stopped"  # its half-unpacked folder removed already
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and started.proc.poll() is None:
            time.sleep(0.05)
        assert started.proc.poll() is not None
        assert [p.name for p in cache.iterdir() if p.name != ".cache.lock"] == []
    finally:
        if started.proc.poll() is None:
            os.killpg(started.proc.pid, signal.SIGKILL)
            started.proc.wait()
        ahead.discard()


def test_no_thread_to_unpack_a_big_archive_leaves_it_to_the_link_step(channel, tmp_path, monkeypatch):
    """No thread can be started to unpack a big archive (a thread limit): unpack says no — the link step unpacks
    that archive — and a later big archive tries again; the first is never unpacked later by a thread that came
    after, owned by no one."""
    import shutil
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)
    monkeypatch.setattr(ahead, "_POOL", [])  # a process that has not started that pool yet
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("lorastrap-unpack"):
            monkeypatch.setattr(threading.Thread, "start", real_start)
            raise RuntimeError("can't start new thread")
        return real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    (tmp_path / "archives").mkdir()
    archives = [Path(shutil.copy2(a, tmp_path / "archives"))
                for a in sorted((channel["dir"] / "linux-64").glob("*.conda"))[:2]]
    cache = tmp_path / "extracted"
    ahead.WORKERS.append(subproc.Worker("install.worker"))
    try:
        got = [ahead.unpack(a, _checked(a), cache) for a in archives]
        assert got == [False, True], got  # the first left to the link step, the second unpacked ahead
        assert ahead.collect(timeout=120) == {archives[1].name[:-6]: "ok"}
        time.sleep(0.5)
        assert not (cache / archives[0].name[:-6]).exists()
    finally:
        ahead.discard()
