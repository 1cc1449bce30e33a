"""The engine worker's feeder (subproc.Worker.send/_fed/ask/discard): timeouts, interrupts, leaks."""
import os
import signal
import threading
import time

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


def test_big_archives_are_unpacked_ahead_each_by_a_worker_of_its_own(channel, home, tmp_path, monkeypatch):
    """An archive over UNPACK_MAX is not queued behind the small ones: it gets a worker of its own as soon as it is
    checked (at most BIG_MOST at once; past that the link step unpacks it), and the link step collects what they
    unpacked — rattler's own cache entries (the folder and its metadata file, naming the archive's sha256)."""
    import hashlib
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)  # every archive is a big one here
    monkeypatch.setattr(ahead, "BIG_MOST", 2)
    archives = sorted((channel["dir"] / "linux-64").glob("*.conda"))[:3]
    cache = tmp_path / "extracted"
    ahead.WORKERS.append(subproc.Worker("locking.rattler_worker"))  # what `lorastrap install` starts first
    try:
        sha = {a: hashlib.sha256(a.read_bytes()).hexdigest() for a in archives}
        handed = [ahead.unpack(a, sha[a], cache) for a in archives]
        assert handed == [True, True, False] and len(ahead.BIG) == 2  # the third: left to the link step
        deadline = time.monotonic() + 60  # collected once both have begun (a request that comes first is "left")
        while time.monotonic() < deadline and len([p for p in cache.glob("*") if p.name != ".cache.lock"]) < 2:
            time.sleep(0.02)
        done = ahead.collect(timeout=120)
        assert ahead.BIG == []
        for a in archives[:2]:
            dist = a.name[:-len(".conda")]
            assert done[dist] == "ok", done
            assert (cache / dist / "info" / "paths.json").is_file()
            assert (cache / f"{dist}.lock").read_bytes()[8:].hex() == sha[a]
        assert not (cache / archives[2].name[:-len(".conda")]).exists()
    finally:
        ahead.discard()
    assert ahead.WORKERS == [] and ahead.BIG == []


@pytest.mark.slow
def test_a_cold_install_unpacks_a_big_archive_ahead_and_needs_no_check_after_the_link(home, tmp_path):
    """A channel with one archive over UNPACK_MAX (numpy, 70 MiB incompressible): a cold install hands it to a
    worker of its own as soon as it is checked, links from that copy (the worker compared the sha256 of the bytes
    it unpacked with the lock's), and every copy carries a stamp afterwards."""
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
    assert "unpacked ahead, each in a worker of its own: numpy-" in res.stderr, res.stderr[-3000:]
    copies = [d for d in (home / "pkgs" / "extracted").iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert sorted(d.name for d in copies if not (d / cache.STAMP).is_file()) == []


def test_an_interrupt_while_the_link_step_waits_for_a_big_archive_leaves_no_worker(channel, tmp_path, monkeypatch):
    """Ctrl-C while the link step waits for a big archive's worker: the worker started ahead is still the
    install's to let go (it is taken only after), so discard() ends both — none is left to a library caller."""
    import hashlib
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)
    archive = sorted((channel["dir"] / "linux-64").glob("*.conda"))[0]
    cache = tmp_path / "extracted"
    started = subproc.Worker("locking.rattler_worker")
    ahead.WORKERS.append(started)
    try:
        assert ahead.unpack(archive, hashlib.sha256(archive.read_bytes()).hexdigest(), cache)
        big = ahead.BIG[0]
        time.sleep(1.0)
        os.kill(big.proc.pid, signal.SIGSTOP)  # still unpacking when the link step comes
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            engines.link(engines.Engine("rattler"), prefix=tmp_path / "env", lock_file=tmp_path / "x-lock.yml",
                         platform="linux-64", cache_dir=cache)
        ahead.discard(wait=False)  # what cli/install.py's finally does
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (started.proc.poll() is None or big.proc.poll() is None):
            time.sleep(0.05)
        assert started.proc.poll() is not None and big.proc.poll() is not None
    finally:
        for w in (started, *ahead.BIG):
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()
        ahead.BIG.clear()
        ahead.WORKERS.clear()


def test_no_thread_to_start_big_archives_workers_leaves_them_to_the_link_step(channel, tmp_path, monkeypatch):
    """The thread that starts big archives' workers cannot be started (a thread limit): unpack says no — the link
    step unpacks the archive — and a later big archive tries again instead of waiting for a thread that is not
    there."""
    import hashlib
    from lorastrap.core import subproc
    monkeypatch.setattr(ahead, "UNPACK_MAX", 0)
    monkeypatch.setattr(ahead, "_STARTER", [])  # a process that has not started that thread yet
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("lorastrap-worker-start"):
            monkeypatch.setattr(threading.Thread, "start", real_start)
            raise RuntimeError("can't start new thread")
        return real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    archives = sorted((channel["dir"] / "linux-64").glob("*.conda"))[:2]
    cache = tmp_path / "extracted"
    ahead.WORKERS.append(subproc.Worker("locking.rattler_worker"))
    try:
        got = []
        t = threading.Thread(target=lambda: got.extend(
            ahead.unpack(a, hashlib.sha256(a.read_bytes()).hexdigest(), cache) for a in archives), daemon=True)
        real_start(t)
        t.join(30)
        assert got == [False, True], got  # the first left to the link step, the second given a worker
        ahead.discard()
        deadline = time.monotonic() + 10  # and no worker started for the first one later, owned by no one
        while time.monotonic() < deadline and _children():
            time.sleep(0.05)
        assert _children() == []
    finally:
        ahead.discard()
