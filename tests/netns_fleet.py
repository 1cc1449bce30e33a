"""Tier B fleet hosts: network namespaces on this machine, each with its own address and an sshd (key auth).

A "hub" namespace holds a bridge with no route out; each node namespace is joined to it by a veth pair; the
controller (ansible-playbook) runs inside the hub.  Everything stays inside namespaces the test made, and
everything is removed at the end — also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

SUBNET = "10.213.77"
SSHD = "/usr/sbin/sshd"
SFTP = "/usr/lib/openssh/sftp-server"


def unavailable_namespaces() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"needs {tool}"
    probe = f"lsprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"this machine does not allow network namespaces: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def unavailable() -> str | None:
    """Why tier B (namespaces with sshd) cannot run here, or None."""
    for tool in ("ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not Path(SSHD).exists():
        return f"needs {SSHD} (Debian openssh-server; .ci/run installs it)"
    return unavailable_namespaces()


def _ip(*args: str, ns: str | None = None) -> None:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _kill_namespace(ns: str) -> None:
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def network(n: int, prefix: str = "ls"):
    """A hub namespace with a bridge (SUBNET.1, no route out) and n node namespaces joined to it.

    Yields (hub, [(node namespace, address)]).  On the way out every process still in one of these namespaces is
    killed and the namespaces are removed — also when the body failed."""
    tag = f"{os.getpid() % 100000}"
    hub = f"{prefix}hub{tag}"
    nodes = [(f"{prefix}node{tag}x{i}", f"{SUBNET}.{10 + i}") for i in range(n)]
    made: list[str] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("link", "set", "lo", "up", ns=hub)
        _ip("link", "add", "br0", "type", "bridge", ns=hub)
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", "br0", ns=hub)
        _ip("link", "set", "br0", "up", ns=hub)
        for i, (ns, addr) in enumerate(nodes):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "add", f"v{i}", "netns", ns, "type", "veth", "peer", "name", f"h{i}", "netns", hub)
            _ip("link", "set", f"h{i}", "master", "br0", ns=hub)
            _ip("link", "set", f"h{i}", "up", ns=hub)
            _ip("addr", "add", f"{addr}/24", "dev", f"v{i}", ns=ns)
            _ip("link", "set", f"v{i}", "up", ns=ns)
        yield hub, nodes
    finally:
        for ns in reversed(made):
            _kill_namespace(ns)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then wait (SIGKILL after 5 s)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextmanager
def fleet(n: int, work: Path):
    """n nodes running sshd; yields (hub namespace, [(name, address)], private key path)."""
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "hostkey")], check=True)
        (work / "authorized_keys").write_text((work / "id.pub").read_text())
        for path in (work / "id", work / "hostkey"):
            path.chmod(0o600)
        with network(n) as (hub, nodes):
            for i, (ns, addr) in enumerate(nodes):
                cfg = work / f"sshd-{i}.conf"
                cfg.write_text(f"Port 22\nListenAddress {addr}\nHostKey {work / 'hostkey'}\n"
                               f"AuthorizedKeysFile {work / 'authorized_keys'}\nPasswordAuthentication no\n"
                               f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin yes\n"
                               f"PidFile {work / f'sshd-{i}.pid'}\nSubsystem sftp {SFTP}\n")
                # sshd needs /run/sshd: a private tmpfs on /run for this node only.
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, "unshare", "--mount", "sh", "-c",
                     f"mount -t tmpfs tmpfs /run && mkdir -p /run/sshd && exec {SSHD} -D -e -f {cfg}"],
                    stdout=subprocess.DEVNULL, stderr=open(work / f"sshd-{i}.log", "w"), start_new_session=True))
            deadline = time.monotonic() + 20
            for i, (ns, addr) in enumerate(nodes):
                while True:
                    ok = subprocess.run(["ip", "netns", "exec", hub, "ssh", "-i", str(work / "id"), "-o",
                                         "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                                         "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=2", f"root@{addr}",
                                         "true"], capture_output=True)
                    if ok.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sshd on {addr} did not answer: "
                                           f"{(work / f'sshd-{i}.log').read_text()[-500:]}")
                    time.sleep(0.2)
            try:
                yield hub, nodes, work / "id"
            finally:
                stop(procs)
    finally:
        stop(procs)
