"""Private channels and indexes: a login given in a URL or in .netrc reaches the hosts it is for, and no other;
nothing lorastrap writes (locks, records, the solver's repodata cache, temporary files) keeps a password."""

import base64
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_install import TEST_ENVS, install, smoke


class _Recorder(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        got = self.headers.get("Authorization")
        self.server.seen.append(got)
        if self.server.auth and got != "Basic " + base64.b64encode(self.server.auth.encode()).decode():
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


def _recording(root, auth=None, host="127.0.0.1"):
    """A file server of ROOT that records each request's Authorization header (and wants AUTH, if given)."""
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = Server((host, 0), lambda *a, **k: _Recorder(*a, directory=str(root), **k))
    srv.seen, srv.auth = [], auth
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.base = f"http://{f'[{host}]' if ':' in host else host}:{srv.server_address[1]}"
    return srv


def _lock(tmp_path, *channels, index):
    return run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                   *[w for c in channels for w in ("--channel", c)], "--pip-index-url", index,
                   "-o", str(tmp_path / "l.yml"))


def test_each_channels_login_goes_to_that_channel_only(tmp_path, home, channel, monkeypatch):
    """Two private channels on one host (two ports), each with a login of its own, and a public one there too: the
    solver's credentials file keys logins by host alone, so these logins stay in their URLs — each server gets its
    own, the public one none."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    a = _recording(channel["root"], auth="bob:s3cret")
    b = _recording(channel["root"], auth="alice:0ther")
    public = _recording(channel["root"])
    try:
        res = _lock(tmp_path, a.base.replace("http://", "http://bob:s3cret@") + "/channel",
                    b.base.replace("http://", "http://alice:0ther@") + "/channel", f"{public.base}/channel",
                    index=f"{public.base}/simple")
        assert res.returncode == 0, res.stderr
        assert a.seen and b.seen and public.seen
        assert not any(public.seen), public.seen  # no login for the public channel on the same host
        assert set(b.seen) == {"Basic " + base64.b64encode(b"alice:0ther").decode()}  # never bob's
    finally:
        for s in (a, b, public):
            s.shutdown()


def test_a_private_channel_on_an_ipv6_host(tmp_path, home, channel, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    try:
        srv = _recording(channel["root"], auth="bob:s3cret", host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        res = _lock(tmp_path, srv.base.replace("http://", "http://bob:s3cret@") + "/channel",
                    index=srv.base.replace("http://", "http://bob:s3cret@") + "/simple")
        assert res.returncode == 0, res.stderr
        assert "s3cret" not in (tmp_path / "l.yml").read_text()
    finally:
        srv.shutdown()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_lock_stopped_during_its_solve_leaves_no_credentials_behind(tmp_path, home, channel, monkeypatch, sig):
    """The solver's credentials file lives in a private folder for the solve only: a lock stopped by SIGTERM or
    SIGHUP while the server is slow removes it, and says it was stopped."""
    from netsim import NetSim
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    srv = NetSim(channel["root"], auth="bob:s3cret", delay_s=30).start()
    host = srv.url.split("://", 1)[1]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lorastrap", "lock", "--envs-dir", str(TEST_ENVS), "--profile",
                                 "test-cpu", "--platform", "linux-64", "--channel", f"http://bob:s3cret@{host}/channel",
                                 "-o", str(tmp_path / "l.yml")], env={**os.environ, "TMPDIR": str(tmp)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(tmp.glob("lorastrap-auth-*")):
            time.sleep(0.02)
        assert list(tmp.glob("lorastrap-auth-*")), "the solve made no credentials folder"
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-2000:]
        assert f"stopped by signal {sig.name}" in err and "Traceback" not in err
        assert list(tmp.iterdir()) == []
    finally:
        srv.shutdown()


def test_a_private_channels_login_is_used_and_never_written_down(tmp_path, home, channel, monkeypatch):
    """--channel and --pip-index-url with user:password: the lock (shared, committed), the environment's record and
    whatever else lorastrap writes hold no password, as conda-lock keeps only an environment variable's name; an
    install of that lock takes the login from the flags given then, or from .netrc; with neither, the 401 says how
    to give it, and no password is shown."""
    from netsim import NetSim
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    srv = NetSim(channel["root"], auth="bob:s3cret").start()
    host = srv.url.split("://", 1)[1]
    private = {"url": f"http://bob:s3cret@{host}/channel", "simple": f"http://bob:s3cret@{host}/simple"}
    try:
        res = install(private, tmp_path / "env1", "--no-verify")
        assert res.returncode == 0, res.stderr
        lock = next((home / "locks").glob("*.conda-lock.yml")).read_text()
        assert f"url: http://{host}/channel/" in lock and "bob" not in lock
        assert json.loads(run_cli("list", "--json").stdout)  # the record reads back
        # Nothing written holds the password, the solver's repodata cache included (its state files name the
        # URLs it fetched: the solver gets them without the login, which goes in a credentials file of its own).
        written = [p for root in (home, tmp_path / "env1") for p in root.rglob("*")
                   if p.is_file() and not p.is_symlink()]
        assert any("repodata" in p.parts for p in written)
        assert not [p for p in written if b"s3cret" in p.read_bytes()]
        shutil.rmtree(home / "pkgs")  # every archive downloaded again, with the lock made above
        res = install(private, tmp_path / "env2", "--no-verify")
        assert res.returncode == 0, res.stderr
        assert "locking" not in res.stderr  # the same lock: its channels are the ones given, login aside
        shutil.rmtree(home / "pkgs")
        res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--prefix", str(tmp_path / "env3"), "--no-verify")
        assert res.returncode == 5, res.stderr  # NetworkError
        assert "retrying" not in res.stderr  # the other downloads were stopped by the 401, not failed in turn
        assert "wants credentials" in res.stderr and ".netrc" in res.stderr and "s3cret" not in res.stderr
        assert not (tmp_path / "env3").exists()
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine {host.split(':')[0]} login bob password s3cret\n")
        netrc.chmod(0o600)
        res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--prefix", str(tmp_path / "env3"), "--no-verify",
                      env={"NETRC": str(netrc)})
        assert res.returncode == 0, res.stderr
        assert smoke(tmp_path / "env3")
    finally:
        srv.shutdown()


def test_a_private_channel_is_locked_with_the_netrc_login_and_a_401_says_so(tmp_path, home, channel, monkeypatch):
    """The solver reads a login from the channel's URL only: lock gives it the host's .netrc entry (what `update`
    and `repair` of such an environment need, its record holding no password); without one, the 401 is a network
    error that says how to give credentials, not a spec that "cannot be solved"."""
    from netsim import NetSim
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    srv = NetSim(channel["root"], auth="bob:s3cret").start()
    host = srv.url.split("://", 1)[1]
    def lock(login="", **kw):
        return run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                       "--channel", f"http://{login}{host}/channel", "--pip-index-url", f"http://{login}{host}/simple",
                       "-o", str(tmp_path / "l.yml"), **kw)
    try:
        res = lock()
        assert res.returncode == 5, res.stderr
        assert "wants credentials" in res.stderr and ".netrc" in res.stderr and "cannot be solved" not in res.stderr
        res = lock("bob:wrong@")
        assert res.returncode == 5 and "wrong" not in res.stderr, res.stderr  # a password is never shown
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine {host.split(':')[0]} login bob password s3cret\n")
        netrc.chmod(0o600)
        res = lock(env={"NETRC": str(netrc)})
        assert res.returncode == 0, res.stderr
        lock = (tmp_path / "l.yml").read_text()
        assert f"url: http://{host}/channel/" in lock and "s3cret" not in lock
    finally:
        srv.shutdown()


def _private(root, tmp_path, monkeypatch):
    """ROOT served with HTTP Basic auth (bob:s3cret), no .netrc: (server, host:port)."""
    from netsim import NetSim
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    srv = NetSim(root, auth="bob:s3cret").start()
    return srv, srv.url.split("://", 1)[1]


def _unwritten(*roots, secret=b"s3cret"):
    return [str(p) for root in roots for p in Path(root).rglob("*")
            if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


@pytest.mark.parametrize("how", ["two channels", "a mirror per channel, its key with the login", "host in capitals",
                                 "the spec's channel"])
def test_private_channels_however_given_install_and_keep_no_password(tmp_path, home, channel, monkeypatch, how):
    """The login goes with each archive of the channel it was given for, whatever the spelling the solver writes
    the lock's URLs in (a host in capitals comes back lower-case), from --channel, a --mirror CHANNEL=URL (its key
    compared without the login) or the spec's own channels: line; and nothing written keeps the password."""
    root = tmp_path / "srv"
    shutil.copytree(channel["root"], root)
    shutil.copytree(root / "channel", root / "channel2")
    srv, host = _private(root, tmp_path, monkeypatch)
    ch = f"http://bob:s3cret@{host}/channel"
    envs, args = TEST_ENVS, ["--channel", ch]
    if how == "two channels":
        args = ["--channel", ch, "--channel", f"http://bob:s3cret@{host}/channel2"]
    elif how.startswith("a mirror"):
        args = ["--channel", ch, "--mirror", f"{ch}={ch}"]
    elif how == "host in capitals":
        args = ["--channel", f"http://bob:s3cret@LOCALHOST:{host.split(':')[1]}/channel"]
    else:
        envs = tmp_path / "envs"
        shutil.copytree(TEST_ENVS, envs, ignore=shutil.ignore_patterns("*.conda-lock.yml"))
        spec = envs / "test-cpu.yml"
        assert "  - lorastrap-test\n" in spec.read_text()
        spec.write_text(spec.read_text().replace("  - lorastrap-test\n", f"  - {ch}\n"))
        args = []
    try:
        res = run_cli("install", "--envs-dir", str(envs), *args, "--pip-index-url", f"http://bob:s3cret@{host}/simple",
                      "--prefix", str(tmp_path / "env"), "--no-verify")
        assert res.returncode == 0, res.stderr
        assert "s3cret" not in res.stderr
        assert not _unwritten(home, tmp_path / "env")
    finally:
        srv.shutdown()


def test_a_local_lock_that_holds_a_login_is_made_anew_when_the_channel_is_given(tmp_path, home, channel,
                                                                                 monkeypatch):
    """A lock written with a login inside (by an earlier release) still installs as it is when no channel is given;
    given the channel again, it is locked anew, without the password."""
    srv, host = _private(channel["root"], tmp_path, monkeypatch)
    ch, idx = f"http://bob:s3cret@{host}/channel", f"http://bob:s3cret@{host}/simple"
    try:
        res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                      "--channel", ch, "--pip-index-url", idx, "-o", str(tmp_path / "l.yml"))
        assert res.returncode == 0, res.stderr
        (home / "locks").mkdir(parents=True)
        local = home / "locks" / "test-cpu.linux-64.conda-lock.yml"
        local.write_text((tmp_path / "l.yml").read_text().replace(f"http://{host}/", f"http://bob:s3cret@{host}/"))
        res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--pip-index-url", idx, "--prefix",
                      str(tmp_path / "e1"), "--no-verify")
        assert res.returncode == 0 and "locking" not in res.stderr, res.stderr
        res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", ch, "--pip-index-url", idx, "--prefix",
                      str(tmp_path / "e2"), "--no-verify")
        assert res.returncode == 0 and "locking" in res.stderr, res.stderr
        assert "s3cret" not in local.read_text()
    finally:
        srv.shutdown()


def test_a_bundle_of_a_private_channel_fetches_with_its_login(tmp_path, home, channel, monkeypatch):
    """`lorastrap bundle` downloads what the lock names from where an install would, login included (it fetched
    the lock's bare URLs: a 401 on a fresh cache)."""
    from netsim import NetSim
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    srv = NetSim(channel["root"], auth="bob:s3cret").start()
    host = srv.url.split("://", 1)[1]
    try:
        res = run_cli("bundle", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--channel",
                      f"http://bob:s3cret@{host}/channel", "--pip-index-url", f"http://bob:s3cret@{host}/simple",
                      "-o", str(tmp_path / "b"), timeout=1800)
        assert res.returncode == 0, res.stderr
        assert "s3cret" not in res.stderr + res.stdout
        assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]
    finally:
        srv.shutdown()


def test_a_scheme_in_capitals_is_a_url_not_a_channel_name(tmp_path, home, channel, monkeypatch):
    """HTTP://USER:PASSWORD@HOST/ch was taken for a channel name: the solver asked conda.anaconda.org for it, the
    password in the path, and the error printed it."""
    srv, host = _private(channel["root"], tmp_path, monkeypatch)
    try:
        res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                      "--channel", f"HTTP://bob:s3cret@{host}/channel", "--pip-index-url",
                      f"http://bob:s3cret@{host}/simple", "-o", str(tmp_path / "l.yml"))
        assert res.returncode == 0, res.stderr
        assert "anaconda.org" not in (tmp_path / "l.yml").read_text() and "s3cret" not in res.stderr
    finally:
        srv.shutdown()


@pytest.mark.parametrize("text", [
    # prefix-dev/pixi#3585 (an Artifactory channel), prefix-dev/pixi#753, and prefix-dev/pixi-build-backends#288:
    # over HTTP/2 there is no reason phrase
    "GatewayError: HTTP status client error (401 Unauthorized) for url (https://artifactory.ramboll.com/artifactory/"
    "api/conda/renopexconda-pytools/noarch/repodata_shards.msgpack.zst)",
    "failed to fetch repodata from channels: HTTP status client error (403 Forbidden) for url (http://mirrors.tuna."
    "tsinghua.edu.cn/anaconda/cloud/conda-forge/linux-64/repodata.json.bz2)",
    "Failed to resolve dependencies: HTTP status client error (401 ) for url (https://private-artifactory.io/"
    "artifactory/api/conda/private-channel/win-64/repodata_shards.msgpack.zst)",
])
def test_the_solvers_real_refusals_are_a_network_error_that_asks_for_credentials(text):
    """What rattler's gateway says when a channel refuses the request, as users reported it: a network error that
    says how to give credentials (and shows no password of the channels), never a spec that "cannot be solved"."""
    from lorastrap.core.errors import NetworkError
    from lorastrap.locking.solve import _solve_error
    err = _solve_error({"ok": False, "error": text}, ["https://bob:s3cret@private.example/channel"], "linux-64",
                       {"__glibc": "2.17"}, Path("vps.yml"))
    assert isinstance(err, NetworkError) and "wants credentials" in err.what and ".netrc" in err.fix
    assert "s3cret" not in str(err.to_dict())
