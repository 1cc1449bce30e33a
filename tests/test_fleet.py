"""Fleets: offline bundles, a shared package cache under concurrent installers, and the Ansible role (tier A)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

TEST_ENVS = ROOT / "tests" / "envs"
DASH = shutil.which("dash") or "/bin/sh"


@pytest.fixture(scope="module")
def bundle(channel, tmp_path_factory):
    """A bundle built from a channel served only for the occasion: the server is stopped afterwards, so every
    install from the bundle runs with no channel to reach."""
    import testchannel
    server, url = testchannel.serve(channel["root"])
    out = tmp_path_factory.mktemp("bundle") / "lora-bundle.tar"
    try:
        res = run_cli("bundle", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--channel", f"{url}/channel",
                      "--pip-index-url", f"{url}/simple", "-o", str(out),
                      env={"LORASTRAP_HOME": str(out.parent / "home")}, timeout=1800)
        assert res.returncode == 0, res.stderr
    finally:
        server.shutdown()
    return out


def test_bundle_contents(bundle, tmp_path):
    import tarfile
    with tarfile.open(bundle) as t:
        names = t.getnames()
    assert "lora-bundle/manifest.json" in names
    assert any(n.startswith("lora-bundle/channel/linux-64/pytorch-") for n in names)
    assert "lora-bundle/channel/linux-64/repodata.json" in names and "lora-bundle/channel/noarch/repodata.json" in names
    assert any(n.startswith("lora-bundle/runtime/wheels/conda_lock-") for n in names)
    assert "lora-bundle/source/setup.sh" in names and "lora-bundle/envs/profiles.yaml" in names


def test_moved_bundle_installs_offline_with_setup_sh(bundle, tmp_path):
    moved = tmp_path / "elsewhere" / bundle.name
    moved.parent.mkdir()
    shutil.copy(bundle, moved)
    subprocess.run(["tar", "-xf", str(moved), "-C", str(moved.parent)], check=True)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTRAP_")}
    env.update(LORASTRAP_HOME=str(home), HOME=str(tmp_path), PIP_NO_INDEX="1")  # no index, no channel: offline
    res = subprocess.run([DASH, str(moved.parent / "lora-bundle" / "source" / "setup.sh"), "--bundle", str(moved),
                          "--prefix", str(tmp_path / "env"), "--json"], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["schema_version"] == 1 and report["ok"] and report["verify_verdict"] == "pass"
    assert report["profile"] == "test-cpu" and report["versions"]["pytorch"].startswith("2.10.0")
    smoke = subprocess.run([str(tmp_path / "env" / "bin" / "lora-smoke")], capture_output=True, text=True)
    assert smoke.returncode == 0 and json.loads(smoke.stdout)["ok"]


def _unpacked(bundle, tmp_path):
    dest = tmp_path / "b"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(dest)], check=True)
    return dest / "lora-bundle"


def test_altered_archive_in_the_bundle_is_refused(bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    victim = next((b / "channel" / "linux-64").glob("pytorch-*.conda"))
    data = bytearray(victim.read_bytes())
    data[-50] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    res = run_cli("install", "--bundle", str(b), "--prefix", str(tmp_path / "env"),
                  env={"LORASTRAP_HOME": str(tmp_path / "home")})
    assert res.returncode == 6, res.stderr
    assert "checksum mismatch" in res.stderr and victim.name in res.stderr
    assert not (tmp_path / "env").exists()


def test_missing_file_in_the_bundle_is_refused(bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    next((b / "pip").glob("*.whl")).unlink()
    res = run_cli("install", "--bundle", str(b), "--prefix", str(tmp_path / "env"),
                  env={"LORASTRAP_HOME": str(tmp_path / "home")})
    assert res.returncode == 6 and "is missing" in res.stderr


def test_shared_cache_with_concurrent_installers(engine, bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    shared = tmp_path / "shared-pkgs"
    procs = []
    for i in range(4):
        env = dict(os.environ, LORASTRAP_HOME=str(tmp_path / f"node{i}"), LORASTRAP_PKGS_DIR=str(shared))
        procs.append(subprocess.Popen([sys.executable, "-m", "lorastrap", "install", "--bundle", str(b), "--prefix",
                                       str(tmp_path / f"env{i}"), "--json"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-2000:] for _, e in outs]
    reports = [json.loads(o) for o, _ in outs]
    manifest = json.loads((b / "manifest.json").read_text())
    package_bytes = sum(m["size"] for rel, m in manifest["files"].items()
                        if (rel.startswith("channel/") and rel.endswith(".conda")) or rel.startswith("pip/"))
    # The package set (archives and wheels) was read from the bundle once for the four nodes, not four times.
    assert sum(r["downloaded_bytes"] for r in reports) == package_bytes
    entries = list((shared / "archives").iterdir())
    assert len(entries) == reports[0]["packages"] + reports[0]["pip_packages"]
    assert {r["engine"].split()[0] for r in reports} == {"embedded" if engine == "rattler" else engine}
    for d in entries:
        files = [f for f in d.iterdir() if not f.name.startswith(".")]
        assert len(files) == 1 and hashlib.sha256(files[0].read_bytes()).hexdigest() == d.name
        assert not list(d.glob("*.part"))
    for i in range(4):
        assert subprocess.run([str(tmp_path / f"env{i}" / "bin" / "lora-smoke")], capture_output=True).returncode == 0


# --- Ansible, tier A: local-connection hosts --------------------------------------------------------------------

def _recap(log: str) -> dict:
    out = {}
    for host, changed, unreachable, failed in re.findall(
            r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", log, re.M):
        out[host] = {"changed": int(changed), "unreachable": int(unreachable), "failed": int(failed)}
    return out


def _playbook(ansible_venv, inventory, report_dir, *extra, cwd):
    env = dict(os.environ, ANSIBLE_HOME=str(cwd / ".ansible"), ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible" / "tmp"),
               ANSIBLE_REMOTE_TEMP=str(cwd / ".ansible" / "rtmp"), ANSIBLE_HOST_KEY_CHECKING="False",
               ANSIBLE_NOCOLOR="1")
    env.pop("LORASTRAP_HOME", None)
    return subprocess.run([str(ansible_venv / "bin" / "ansible-playbook"), "-i", str(inventory),
                           str(ROOT / "deploy" / "ansible" / "site.yml"), "-e", f"lorastrap_report_dir={report_dir}",
                           "-f", "5", *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def test_ansible_fleet_tier_a(ansible_venv, bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    inv = tmp_path / "inventory.ini"
    inv.write_text(f"""[nodes]
node1 lorastrap_home={tmp_path}/node1
node2 lorastrap_home={tmp_path}/node2
node3 lorastrap_home={tmp_path}/node3
broken lorastrap_home={tmp_path}/broken lorastrap_bundle={tmp_path}/no-such-bundle
gone ansible_connection=ssh ansible_host=127.0.0.1 ansible_port=1 lorastrap_home={tmp_path}/gone

[nodes:vars]
ansible_connection=local
ansible_python_interpreter="{{{{ ansible_playbook_python }}}}"
lorastrap_bundle={b}
lorastrap_pkgs_dir={tmp_path}/shared-pkgs
""")
    res = _playbook(ansible_venv, inv, reports, cwd=tmp_path)
    assert res.returncode in (2, 4), res.stdout[-3000:]  # a host failed, one was unreachable
    recap = _recap(res.stdout)
    assert recap["gone"]["unreachable"] == 1 and recap["broken"]["failed"] == 1
    assert all(recap[h]["failed"] == 0 and recap[h]["changed"] > 0 for h in ("node1", "node2", "node3"))
    fleet = json.loads((reports / "fleet.json").read_text())
    status = {r["host"]: r["status"] for r in fleet["hosts"]}
    assert status == {"broken": "failed", "gone": "unreachable", "node1": "ok", "node2": "ok", "node3": "ok"}
    assert [r["host"] for r in fleet["hosts"]] == sorted(status)
    ok = [r for r in fleet["hosts"] if r["status"] == "ok"]
    assert all(r["verify"] == "pass" and r["profile"] == "test-cpu" and r["versions"]["pytorch"] for r in ok)
    assert "no-such-bundle" in next(r for r in fleet["hosts"] if r["host"] == "broken")["error"]
    assert "summary: ok 3, planned 0, failed 1, unreachable 1" in res.stdout
    # Shared cache: each archive and wheel once for the three nodes.
    manifest = json.loads((b / "manifest.json").read_text())
    packages = [rel for rel in manifest["files"]
                if (rel.startswith("channel/") and rel.endswith(".conda")) or rel.startswith("pip/")]
    assert len(list((tmp_path / "shared-pkgs" / "archives").iterdir())) == len(packages)

    again = _playbook(ansible_venv, inv, reports, cwd=tmp_path)
    recap = _recap(again.stdout)
    assert all(recap[h]["changed"] == 0 and recap[h]["failed"] == 0 for h in ("node1", "node2", "node3")), again.stdout[-3000:]

    check = _playbook(ansible_venv, inv, reports, "--check", cwd=tmp_path)
    recap = _recap(check.stdout)
    assert all(recap[h]["changed"] == 0 for h in ("node1", "node2", "node3")), check.stdout[-3000:]
    fleet = json.loads((reports / "fleet.json").read_text())
    assert {r["host"]: r["status"] for r in fleet["hosts"]}["node1"] == "planned"
    assert {r["host"]: r["profile"] for r in fleet["hosts"]}["node1"] == "test-cpu"


# --- Ansible, tier B: hosts in network namespaces, over real SSH --------------------------------------------------

def test_ansible_fleet_tier_b_over_ssh(ansible_venv, bundle, tmp_path):
    import netns_fleet
    why = netns_fleet.unavailable()
    if why:
        pytest.skip(f"tier B: {why}")
    b = _unpacked(bundle, tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    with netns_fleet.fleet(3, tmp_path) as (hub, nodes, key):
        lines = [f"{ns} ansible_host={addr} lorastrap_home={tmp_path}/{ns}" for ns, addr in nodes]
        inv = tmp_path / "inventory.ini"
        inv.write_text("[nodes]\n" + "\n".join(lines) + f"""

[nodes:vars]
ansible_user=root
ansible_ssh_private_key_file={key}
ansible_ssh_common_args=-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ControlMaster=no
ansible_python_interpreter={ansible_venv / "bin" / "python"}
lorastrap_bundle={b}
""")
        env = dict(os.environ, ANSIBLE_HOME=str(tmp_path / ".ansible"), ANSIBLE_LOCAL_TEMP=str(tmp_path / ".ansible/tmp"),
                   ANSIBLE_REMOTE_TEMP=str(tmp_path / ".ansible/rtmp"), ANSIBLE_HOST_KEY_CHECKING="False",
                   ANSIBLE_SSH_ARGS="-o ControlMaster=no", ANSIBLE_NOCOLOR="1")
        env.pop("LORASTRAP_HOME", None)
        res = subprocess.run(["ip", "netns", "exec", hub, str(ansible_venv / "bin" / "ansible-playbook"), "-i",
                              str(inv), str(ROOT / "deploy" / "ansible" / "site.yml"), "-e",
                              f"lorastrap_report_dir={reports}", "-f", "3"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, res.stdout[-4000:]
        fleet = json.loads((reports / "fleet.json").read_text())
        assert [r["status"] for r in fleet["hosts"]] == ["ok"] * 3
        assert all(r["verify"] == "pass" for r in fleet["hosts"])
