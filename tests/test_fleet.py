"""Fleets: offline bundles, a shared package cache under concurrent installers, the Ansible role (tiers A and B),
and the Slurm path on a real Slurm cluster in network namespaces."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

TEST_ENVS = ROOT / "tests" / "envs"
DASH = shutil.which("dash") or "/bin/sh"


def _bundle_cli(channel, out, profile, *more, envs=TEST_ENVS):
    """`lorastrap bundle` from a channel served only for the occasion: the server is stopped afterwards, so every
    install from the bundle runs with no channel to reach."""
    import testchannel
    server, url = testchannel.serve(channel["root"])
    try:
        return run_cli("bundle", "--envs-dir", str(envs), "--profile", profile, "--channel", f"{url}/channel",
                       "--pip-index-url", f"{url}/simple", "-o", str(out), *more,
                       env={"LORASTRAP_HOME": str(out.parent / "home")}, timeout=1800)
    finally:
        server.shutdown()


def _make_bundle(channel, out, profile, *more):
    res = _bundle_cli(channel, out, profile, *more)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The head node's bundle folder: every bundle of the tests is made there, so they share one runtime store."""
    return tmp_path_factory.mktemp("site")


@pytest.fixture(scope="module")
def bundle(channel, site):
    return _make_bundle(channel, site / "lora-bundle.tar", "test-cpu")


@pytest.fixture(scope="module")
def cuda_bundle(channel, site):
    """The test-cuda profile's bundle (a folder): nodes whose machine plans test-cuda install it."""
    return _make_bundle(channel, site / "cuda-bundle", "test-cuda")


def test_bundle_contents(bundle, cuda_bundle):
    import tarfile
    with tarfile.open(bundle) as t:
        names = t.getnames()
    assert "lora-bundle/manifest.json" in names
    assert any(n.startswith("lora-bundle/channel/linux-64/pytorch-") for n in names)
    assert "lora-bundle/channel/linux-64/repodata.json" in names and "lora-bundle/channel/noarch/repodata.json" in names
    assert "lora-bundle/source/setup.sh" in names and "lora-bundle/envs/profiles.yaml" in names
    # The runtime wheels are not inside: one store beside the bundles holds each once for both profiles.
    assert not any("/runtime/" in n for n in names)
    store = bundle.parent / "lorastrap-runtime" / "wheels"
    listed = {}
    with tarfile.open(bundle) as t:
        cpu = json.loads(t.extractfile("lora-bundle/manifest.json").read())
    cuda = json.loads((cuda_bundle / "manifest.json").read_text())
    assert not any(rel.startswith("runtime/") for rel in list(cpu["files"]) + list(cuda["files"]))
    for m in (cpu, cuda):
        assert m["runtime"]["store"] == "../lorastrap-runtime/wheels"
        assert any(n.startswith("conda_lock-") for n in m["runtime"]["wheels"])
        for name, meta in m["runtime"]["wheels"].items():
            assert listed.setdefault(name, meta) == meta  # one file per name, whichever bundle lists it
    on_disk = {p.name: p for p in store.iterdir() if not p.name.startswith(".")}
    assert set(on_disk) == set(listed)
    for name, p in on_disk.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == listed[name]["sha256"]
    shared = set(cpu["runtime"]["wheels"]) & set(cuda["runtime"]["wheels"])
    assert sum(listed[n]["size"] for n in shared) > 0.9 * sum(m["size"] for m in listed.values())
    assert cpu["bytes"] < sum(m["size"] for m in listed.values())  # the wheels were most of a bundle


def test_moved_bundle_installs_offline_with_setup_sh(bundle, tmp_path):
    moved = tmp_path / "elsewhere" / bundle.name
    moved.parent.mkdir()
    shutil.copy(bundle, moved)
    subprocess.run(["tar", "-xf", str(moved), "-C", str(moved.parent)], check=True)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTRAP_")}
    env.update(LORASTRAP_HOME=str(home), HOME=str(tmp_path), PIP_NO_INDEX="1")  # no index, no channel: offline
    argv = [DASH, str(moved.parent / "lora-bundle" / "source" / "setup.sh"), "--bundle", str(moved), "--prefix",
            str(tmp_path / "env"), "--json"]
    # Copied without the runtime store beside it: refused, naming what to copy.
    res = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert res.returncode == 6, res.stderr[-3000:]
    assert f"copy it to {moved.parent}/lorastrap-runtime" in res.stderr and not (tmp_path / "env").exists()
    shutil.copytree(bundle.parent / "lorastrap-runtime", moved.parent / "lorastrap-runtime")
    res = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["schema_version"] == 1 and report["ok"] and report["verify_verdict"] == "pass"
    assert report["profile"] == "test-cpu" and report["versions"]["pytorch"].startswith("2.10.0")
    smoke = subprocess.run([str(tmp_path / "env" / "bin" / "lora-smoke")], capture_output=True, text=True)
    assert smoke.returncode == 0 and json.loads(smoke.stdout)["ok"]


def _unpacked(bundle, tmp_path):
    """The bundle unpacked in a folder of the test's own, with the runtime store beside it (as copied from the head
    node's bundle folder)."""
    dest = tmp_path / "b"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(bundle), "-C", str(dest)], check=True)
    (dest / "lorastrap-runtime").symlink_to(bundle.parent / "lorastrap-runtime")
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
    assert f"the bundle {b} holds a file that differs" in res.stderr and "re-lock" not in res.stderr
    assert not (tmp_path / "env").exists()


def _retar(unpacked, tar, edit):
    """Rebuild the bundle .tar at TAR from the folder UNPACKED after edit(folder): the manifest follows the files,
    as `lorastrap bundle` writes it (a new build of the same bundle at the same path)."""
    import tarfile
    edit(unpacked)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    for rel, meta in manifest["files"].items():
        data = (unpacked / rel).read_bytes()
        meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (unpacked / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with tarfile.open(tar, "w") as t:
        t.add(unpacked, arcname=tar.stem)


def test_a_rebuilt_or_damaged_bundle_tar_is_unpacked_again(bundle, tmp_path):
    """X/ beside X.tar stands for the tar only while it is that tar's unpacked copy: a rebuilt tar at the same
    path, or a damaged X/, is unpacked again; a truncated tar is refused."""
    from lorastrap.core.errors import ConfigError
    from lorastrap.install.bundles import identity, open_bundle
    site = tmp_path / "site"
    site.mkdir()
    tar = site / bundle.name
    shutil.copy(bundle, tar)
    first = open_bundle(tar)
    assert first == site / "lora-bundle" and identity(first)["id"]
    old_id = identity(first)["id"]
    assert open_bundle(tar) == first and identity(first)["id"] == old_id  # the same tar: reused as it is

    def newer(folder):
        (folder / "source" / "README.md").write_text("a newer build\n")
    _retar(_unpacked(bundle, tmp_path), tar, newer)
    again = open_bundle(tar)
    assert (again / "source" / "README.md").read_text() == "a newer build\n"
    assert identity(again)["id"] != old_id
    assert not [p for p in site.iterdir() if p.name.startswith(".unpack-")]

    victim = next((again / "channel" / "linux-64").glob("pytorch-*.conda"))
    victim.unlink()  # a damaged unpacked copy: unpacked again from the tar
    assert open_bundle(tar) == again and victim.is_file()

    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    shutil.rmtree(again)
    with pytest.raises(ConfigError) as err:
        open_bundle(tar)
    assert "damaged or truncated" in err.value.why


def test_missing_file_in_the_bundle_is_refused(bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    next((b / "pip").glob("*.whl")).unlink()
    res = run_cli("install", "--bundle", str(b), "--prefix", str(tmp_path / "env"),
                  env={"LORASTRAP_HOME": str(tmp_path / "home")})
    assert res.returncode == 6 and "is missing" in res.stderr


def test_a_no_op_notices_a_damaged_environment(bundle, tmp_path):
    """Installing the lock an environment already has checks its files (exists, size) and rebuilds it when one of
    its packages' files is missing or changed; an intact one is left alone."""
    b = _unpacked(bundle, tmp_path)
    env, envs = tmp_path / "env", {"LORASTRAP_HOME": str(tmp_path / "home")}
    argv = ("install", "--bundle", str(b), "--prefix", str(env), "--json", "--no-verify")
    assert run_cli(*argv, env=envs).returncode == 0
    again = run_cli(*argv, env=envs)
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False, again.stderr
    assert "their files all there" in again.stderr
    smoke = env / "bin" / "lora-smoke"
    (env / "notes.txt").write_text("the user's own file")
    victim = next(p for p in (env / "lib").rglob("*.py") if p.stat().st_size > 0)
    victim.unlink()
    res = run_cli(*argv, env=envs)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["changed"] is True and "1 file(s) of its packages were missing" in doc["repaired"]
    assert str(victim.relative_to(env)) in doc["repaired"] and "rebuilding it from the lock" in res.stderr
    assert victim.is_file() and (env / "notes.txt").read_text() == "the user's own file"
    with open(victim, "a") as f:
        f.write("# grown\n")  # a changed size (hard links: the cache's copy too, which the rebuild checks)
    res = run_cli(*argv, env=envs)
    assert res.returncode == 0 and f"{victim.relative_to(env)} (" in json.loads(res.stdout)["repaired"], res.stderr
    assert "bytes, its package has" in json.loads(res.stdout)["repaired"] and "# grown" not in victim.read_text()
    assert subprocess.run([str(smoke)], capture_output=True).returncode == 0


def test_reverify_checks_an_unchanged_environment_and_a_failure_names_the_machine(bundle, tmp_path):
    """--reverify (what the fleet paths pass) verifies an environment that was already up to date; one that breaks
    without losing a package's file fails with the repair command that works as printed, and the JSON error
    carries the machine (its GPUs) it failed on."""
    b = _unpacked(bundle, tmp_path)
    machine = tmp_path / "t4.json"
    _recorded("t4_driver-535--cuda12", machine)
    env, envs = tmp_path / "env", {"LORASTRAP_HOME": str(tmp_path / "home")}
    argv = ("install", "--bundle", str(b), "--prefix", str(env), "--json", "--machine", str(machine))
    assert run_cli(*argv, env=envs).returncode == 0
    again = run_cli(*argv, "--reverify", env=envs)
    doc = json.loads(again.stdout)
    assert again.returncode == 0 and doc["changed"] is False and doc["verify_verdict"] == "pass", again.stderr
    assert json.loads(run_cli(*argv, env=envs).stdout)["verify_verdict"] == "unchanged"
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "sitecustomize.py").write_text("raise SystemExit('broken by a site hook')\n")  # no package's file
    assert json.loads(run_cli(*argv, env=envs).stdout)["changed"] is False  # the file check cannot see it
    res = run_cli(*argv, "--reverify", env=envs)
    assert res.returncode == 9, res.stderr
    err = json.loads(res.stdout)
    assert err["what"].startswith(f"the environment at {env} failed verification")
    assert err["machine"]["gpus"] == ["Tesla T4 (cc 7.5)"] and err["machine"]["driver"].startswith("535")
    assert "nothing was changed" in err["fix"] and "the previous environment was restored" not in err["fix"]
    # the fix names lorastrap as it was run here (`PYTHON -m lorastrap repair …`): its arguments are run as given
    repair = re.search(r"`[^`]*lorastrap (repair [^`]+)`", err["fix"]).group(1).split()
    (site / "sitecustomize.py").unlink()
    assert run_cli(*repair, "--no-verify", env=envs).returncode == 0
    assert run_cli(*argv, "--reverify", env=envs).returncode == 0


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
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(  # the failing ones whole, not cut by the repr
        f"installer {i}: exit {p.returncode}\nstdout: {o[-3000:]}\nstderr: {e[-6000:]}"
        for i, (p, (o, e)) in enumerate(zip(procs, outs)) if p.returncode)
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
    """ansible-playbook site.yml; report_dir None: the inventory's own lorastrap_report_dir."""
    env = dict(os.environ, ANSIBLE_HOME=str(cwd / ".ansible"), ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible" / "tmp"),
               ANSIBLE_REMOTE_TEMP=str(cwd / ".ansible" / "rtmp"), ANSIBLE_HOST_KEY_CHECKING="False",
               ANSIBLE_NOCOLOR="1")
    env.pop("LORASTRAP_HOME", None)
    report = ["-e", f"lorastrap_report_dir={report_dir}"] if report_dir else []
    return subprocess.run([str(ansible_venv / "bin" / "ansible-playbook"), "-i", str(inventory),
                           str(ROOT / "deploy" / "ansible" / "site.yml"), *report, "-f", "5", *extra], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=1800)


def _readme_inventory(tmp_path) -> str:
    """The README's own inventory, on two local-connection hosts: its host range cut to two, its /shared and /opt
    paths under TMP_PATH (each host its own /opt, as separate machines have), and the connection lines."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^( *)```ini\n\1# inventory.ini[^\n]*\n(.*?)^\1```", text, re.S | re.M)
    inv = textwrap.dedent(block.group(2))
    assert re.search(r"^gpu\[01:16\]\.cluster$", inv, re.M) and inv.rstrip().splitlines()[-1].startswith("lorastrap_")
    for key in ("lorastrap_bundle_tar=/shared/", "lorastrap_pkgs_dir=/shared/", "lorastrap_prefix=/opt/",
                "lorastrap_report_dir=/shared/"):
        assert key in inv, key
    inv = inv.replace("gpu[01:16].cluster", "gpu[01:02].cluster").replace("=/shared/", f"={tmp_path}/shared/")
    inv = inv.replace("=/opt/", f"={tmp_path}/{{{{ inventory_hostname }}}}/opt/")
    return inv + f"""ansible_connection=local
ansible_python_interpreter="{{{{ ansible_playbook_python }}}}"
lorastrap_home={tmp_path}/{{{{ inventory_hostname }}}}/home
"""


@pytest.mark.slow
def test_ansible_fleet_from_the_readme_inventory(ansible_venv, bundle, tmp_path):
    """The README's inventory as documented (a bundle .tar copied to each node with the runtime store beside it,
    the report folder from the inventory): --check on fresh nodes, the install, a re-run that verifies again and
    changes nothing, and a run where every host fails still writes fleet.json, with each node's machine."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(bundle, shared / "lora-bundle.tar")
    (shared / "lorastrap-runtime").symlink_to(bundle.parent / "lorastrap-runtime")
    inv = tmp_path / "inventory.ini"
    inv.write_text(_readme_inventory(tmp_path))
    reports, hosts = shared / "reports", ("gpu01.cluster", "gpu02.cluster")
    prefix = {h: tmp_path / h / "opt" / "envs" / "lora" for h in hosts}

    check = _playbook(ansible_venv, inv, None, "--check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout[-4000:]
    # The one change --check makes on a fresh node is its data dir (to unpack the bundle and run its planner).
    assert {h: r["changed"] for h, r in _recap(check.stdout).items()} == {h: 1 for h in hosts} | {"localhost": 0}
    changed_tasks = re.findall(r"^TASK \[([^\]]+)\][^\n]*\n(?:(?!TASK \[).*\n)*?changed: \[", check.stdout, re.M)
    assert set(changed_tasks) == {"lorastrap : Create the data dir"}, check.stdout[-4000:]
    fleet = json.loads((reports / "fleet.json").read_text())
    assert [(r["host"], r["status"], r["profile"]) for r in fleet["hosts"]] == [(h, "planned", "test-cpu") for h in hosts]
    assert not any(p.exists() for p in prefix.values())

    res = _playbook(ansible_venv, inv, None, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    fleet = json.loads((reports / "fleet.json").read_text())
    assert [(r["status"], r["verify"], r["changed"]) for r in fleet["hosts"]] == [("ok", "pass", True)] * 2
    assert all(json.loads((reports / f"{h}.json").read_text())["prefix"] == str(prefix[h]) for h in hosts)

    again = _playbook(ansible_venv, inv, None, cwd=tmp_path)
    assert again.returncode == 0 and all(r["changed"] == 0 for r in _recap(again.stdout).values()), again.stdout[-4000:]
    fleet = json.loads((reports / "fleet.json").read_text())
    assert [(r["status"], r["verify"], r["changed"]) for r in fleet["hosts"]] == [("ok", "pass", False)] * 2

    (tmp_path / "afile").write_text("")
    failed = _playbook(ansible_venv, inv, None, "-e", f"lorastrap_prefix={tmp_path}/afile/env", cwd=tmp_path)
    assert failed.returncode == 2, failed.stdout[-4000:]
    assert all(_recap(failed.stdout)[h]["failed"] == 1 for h in hosts)
    fleet = json.loads((reports / "fleet.json").read_text())
    assert [(r["host"], r["status"]) for r in fleet["hosts"]] == [(h, "failed") for h in hosts]
    assert all("afile is a file" in r["error"] for r in fleet["hosts"])
    for h in hosts:
        node = json.loads((reports / f"{h}.json").read_text())
        assert node["machine"]["platform"] == "linux-64" and node["machine"]["gpus"] == [], node


@pytest.mark.slow
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

def _hosts_or_skip(module: str, what: str):
    """The namespace-hosts helper module, or a skip that says what this machine lacks."""
    import importlib
    helper = importlib.import_module(module)
    why = helper.unavailable()
    if why:
        pytest.skip(f"{what}: {why}")
    return helper


@pytest.mark.slow
def test_ansible_fleet_tier_b_over_ssh(ansible_venv, bundle, tmp_path):
    netns_fleet = _hosts_or_skip("netns_fleet", "tier B")
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


# --- Slurm: slurmctld and one slurmd per node, in network namespaces ----------------------------------------------

def _recorded(name: str, out):
    import recorded_nvml
    out.write_text(recorded_nvml.machine(recorded_nvml.load(recorded_nvml.FIXTURES / f"{name}.json")).model_dump_json())


def _fleet_cli(*args, hub=None, env=None, timeout=600):
    """`lorastrap fleet …` as on a login node: inside the hub namespace, where slurmctld listens."""
    argv = [sys.executable, "-m", "lorastrap", "fleet", *args]
    full = {k: v for k, v in os.environ.items() if k not in ("LORASTRAP_HOME", "LORASTRAP_PKGS_DIR")}
    full.update(env or {})
    return subprocess.run((["ip", "netns", "exec", hub] if hub else []) + argv, cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _rows(reports):
    return {r["host"]: r for r in json.loads((reports / "fleet.json").read_text())["hosts"]}


def _node(reports, node):
    """A node's own report in the newest run's folder (REPORT_DIR/job-JOB)."""
    folder = json.loads((reports / "fleet.json").read_text())["report_dir"]
    return json.loads((Path(folder) / f"{node}.json").read_text())


def _job_state(hub, env, job):
    out = subprocess.run(["ip", "netns", "exec", hub, "scontrol", "show", "job", "-o", job], env=env,
                         capture_output=True, text=True).stdout
    return re.search(r"JobState=(\S+)", out).group(1)


def _installed_at(prefix):
    return json.loads((prefix / "conda-meta" / "lorastrap" / "record.json").read_text())["installed_at"]


@pytest.mark.slow
def test_slurm_fleet(bundle, cuda_bundle, tmp_path):
    netns_slurm = _hosts_or_skip("netns_slurm", "Slurm fleet")
    cpu = _unpacked(bundle, tmp_path)
    machines = tmp_path / "machines"
    machines.mkdir()
    _recorded("h100-sxm_driver-550--cuda12", machines / "sn0.json")  # plans test-cuda
    _recorded("k80_driver-470--cpu", machines / "sn1.json")  # a driver too old for CUDA 12: test-cpu
    # sn2 has no recorded description: it detects itself (no GPU here): test-cpu
    envs, reports, pkgs = tmp_path / "envs", tmp_path / "reports", tmp_path / "shared-pkgs"
    (envs / "lora-sn3").mkdir(parents=True)
    (envs / "lora-sn3" / "notes.txt").write_text("not an environment: sn3's install must refuse to replace it")
    common = ["--bundle", str(cpu), "--bundle", str(cuda_bundle), "--report-dir", str(reports), "--machines",
              str(machines), "--pkgs-dir", str(pkgs), "--time", "10"]
    with netns_slurm.cluster(5, tmp_path / "slurm") as (hub, names, env):
        subprocess.run(["ip", "netns", "exec", hub, "scontrol", "update", "NodeName=sn4", "State=DRAIN",
                        "Reason=maintenance"], env=env, check=True)
        env = {**env, "LORASTRAP_HOME": str(tmp_path / "login-home")}
        res = _fleet_cli("slurm", *common, "--prefix", f"{envs}/lora-%n", hub=hub, env=env)
        assert res.returncode == 13, res.stderr[-3000:]  # a node failed, one was not started
        rows = _rows(reports)
        assert {h: r["status"] for h, r in rows.items()} == {
            "sn0": "ok", "sn1": "ok", "sn2": "ok", "sn3": "failed", "sn4": "not-started"}
        assert {h: rows[h]["profile"] for h in ("sn0", "sn1", "sn2")} == {
            "sn0": "test-cuda", "sn1": "test-cpu", "sn2": "test-cpu"}  # heterogeneous: each node's own plan
        assert rows["sn0"]["gpus"] == ["NVIDIA H100 80GB HBM3 (cc 9.0)"] and rows["sn2"]["gpus"] == []
        assert all(rows[h]["verify"] == "pass" and rows[h]["changed"] for h in ("sn0", "sn1", "sn2"))
        assert "is not a conda environment" in rows["sn3"]["error"]
        assert _node(reports, "sn3")["exit_code"] == 2 and rows["sn3"]["log"].endswith("sn3.log")
        fleet = json.loads((reports / "fleet.json").read_text())
        first_job = fleet["slurm_job"]
        assert fleet["report_dir"] == str(reports / f"job-{first_job}") and fleet["lorastrap_version"]
        assert rows["sn0"]["reason"].startswith("test-cuda: ") and rows["sn1"]["reason"].startswith("test-cpu: ")
        assert rows["sn0"]["bundle"] == json.loads((reports / f"job-{first_job}" / "sn0.json").read_text())["bundle"]["id"]
        assert rows["sn1"]["bundle"] != rows["sn0"]["bundle"] and rows["sn1"]["lock"] and rows["sn1"]["finished_at"]
        assert re.search(r"^sn1 +ok +yes +test-cpu +Tesla K80", res.stdout, re.M), res.stdout
        assert re.search(r"^sn0: test-cuda because test-cuda: ", res.stdout, re.M)
        assert rows["sn4"]["error"] == "Slurm did not start it: node sn4 is drained (reason: maintenance)"
        assert "summary: ok 3, planned 0, failed 1, unreachable 0, not-started 1" in res.stdout
        assert (envs / "lora-sn3" / "notes.txt").exists() and not (envs / "lora-sn4").exists()
        for node, build in (("sn0", "cuda"), ("sn1", "cpu"), ("sn2", "cpu")):
            smoke = subprocess.run([str(envs / f"lora-{node}" / "bin" / "lora-smoke")], capture_output=True, text=True)
            assert smoke.returncode == 0 and json.loads(smoke.stdout)["torch_build"] == build
        # The shared cache: every archive and wheel read once for the whole job (sn1 and sn2 share the cpu bundle's).
        node_reports = {n: _node(reports, n) for n in ("sn0", "sn1", "sn2")}
        needed = {}
        for b in (cpu, cuda_bundle):
            manifest = json.loads((b / "manifest.json").read_text())
            needed.update({m["sha256"]: m["size"] for rel, m in manifest["files"].items()
                           if (rel.startswith("channel/") and rel.endswith(".conda")) or rel.startswith("pip/")})
        assert sorted(d.name for d in (pkgs / "archives").iterdir()) == sorted(needed)
        assert sum(r["downloaded_bytes"] for r in node_reports.values()) == sum(needed.values())
        stamps = {n: _installed_at(envs / f"lora-{n}") for n in ("sn0", "sn1", "sn2")}

        # Again (sn3 left out, sn4 still drained): nothing changes, every node verifies its environment again on
        # its own devices; the job itself COMPLETED (the drained node counts only for the login node's exit code).
        again = _fleet_cli("slurm", *common, "--prefix", f"{envs}/lora-%n", "--nodelist", "sn[0-2],sn4", hub=hub,
                           env=env)
        assert again.returncode == 13, again.stderr[-3000:]
        rows = _rows(reports)
        assert all(rows[h]["status"] == "ok" and rows[h]["changed"] is False and rows[h]["verify"] == "pass"
                   for h in ("sn0", "sn1", "sn2")), rows
        assert all(_node(reports, n)["downloaded_bytes"] == 0 for n in stamps)
        second_job = json.loads((reports / "fleet.json").read_text())["slurm_job"]
        assert second_job != first_job and _job_state(hub, env, second_job) == "COMPLETED"
        assert (reports / f"job-{first_job}" / "sn3.json").is_file()  # the first run's reports kept apart
        assert re.search(r"^sn1 +ok +no +test-cpu", again.stdout, re.M), again.stdout

        # A damaged environment the no-op cannot see (a file whose size it cannot know): verification fails, the
        # row's fix runs as printed, and --repair rebuilds it without being asked.
        smoke = envs / "lora-sn1" / "bin" / "lora-smoke"

        def damage():
            smoke.unlink()  # a new file: the package cache's hard-linked copy stays intact
            smoke.write_text("#!/bin/sh\nexit 3\n")
            smoke.chmod(0o755)
        damage()
        broken = _fleet_cli("slurm", *common, "--prefix", f"{envs}/lora-%n", "--nodelist", "sn1", hub=hub, env=env)
        row = _rows(reports)["sn1"]
        assert broken.returncode == 13 and row["status"] == "failed" and "failed verification" in row["error"], row
        assert row["gpus"] == ["Tesla K80 (cc 3.7)", "Tesla K80 (cc 3.7)"] and row["profile"] == "test-cpu"
        fix = re.search(r"`([^`]* repair [^`]*)`", row["fix"]).group(1)
        assert "--envs-dir" in fix and "LORASTRAP_HOME=" in fix
        assert subprocess.run(["sh", "-c", fix], cwd=tmp_path, capture_output=True, text=True).returncode == 0
        assert subprocess.run([str(smoke)], capture_output=True).returncode == 0
        damage()
        repaired = _fleet_cli("slurm", *common, "--prefix", f"{envs}/lora-%n", "--nodelist", "sn1", "--repair",
                              hub=hub, env=env)
        row = _rows(reports)["sn1"]
        assert repaired.returncode == 0 and row["status"] == "ok" and row["verify"] == "pass", repaired.stderr[-3000:]
        assert "rebuilt from its own lock (--repair)" in row["repaired"] and " repaired " in repaired.stdout
        stamps["sn1"] = _installed_at(envs / "lora-sn1")
        assert {n: _installed_at(envs / f"lora-{n}") for n in stamps} == stamps

        # One profile for every node: the nodes that cannot run it refuse, and keep what they have.
        forced = _fleet_cli("slurm", *common, "--prefix", f"{envs}/lora-%n", "--profile", "test-cuda",
                            "--nodelist", "sn[0-2],sn9", hub=hub, env=env)
        assert forced.returncode == 13, forced.stderr[-3000:]
        rows = _rows(reports)
        assert set(rows) == {"sn0", "sn1", "sn2", "sn9"} and rows["sn0"]["status"] == "ok"
        assert rows["sn9"]["status"] == "not-started"
        assert rows["sn9"]["error"] == "Slurm did not start it: Slurm knows no node sn9 in partition lora"
        for node, why in (("sn1", "driver must support CUDA >= 12.0: it supports 11.4"),
                          ("sn2", "needs an NVIDIA GPU: no usable NVIDIA GPU")):
            assert rows[node]["status"] == "failed" and rows[node]["reason"] == "forced by --profile test-cuda"
            assert rows[node]["error"] == f"profile test-cuda cannot run on node {node}"
            assert rows[node]["why"].startswith(why) and _node(reports, node)["exit_code"] == 3
        assert {n: _installed_at(envs / f"lora-{n}") for n in stamps} == stamps

        # The batch script submitted by hand, as a site would: the .tar bundle (the nodes unpack it side by side),
        # one shared environment for three nodes: one installs it, every one verifies it; the job's last step
        # writes fleet.json.
        tar = tmp_path / "site" / bundle.name
        tar.parent.mkdir()
        shutil.copy(bundle, tar)
        shared_reports = tmp_path / "shared-reports"
        job = subprocess.run(["ip", "netns", "exec", hub, "sbatch", "--wait", "-N", "3", "-w", "sn[0-2]", "-o",
                              f"{shared_reports}-%j.out", str(ROOT / "deploy" / "slurm" / "lorastrap-fleet.sbatch"),
                              "--bundle", str(tar), "--report-dir", str(shared_reports), "--pkgs-dir", str(pkgs),
                              "--prefix", str(tmp_path / "shared-env")], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, "LORASTRAP": f"{sys.executable} -m lorastrap"}, timeout=300)
        out = "".join(p.read_text() for p in tmp_path.glob("shared-reports-*.out"))
        assert job.returncode == 0, out[-3000:]
        rows = _rows(shared_reports)
        assert sorted(rows) == ["sn0", "sn1", "sn2"], out[-3000:]
        assert all(r["status"] == "ok" and r["verify"] == "pass" and r["profile"] == "test-cpu" for r in rows.values())
        assert sorted(r["changed"] for r in rows.values()) == [False, False, True]
        assert "summary: ok 3, planned 0, failed 0, unreachable 0" in out

        # Ctrl-C on the login node while sn1 works and sn2 is done: the job is cancelled, the table of what had
        # finished is printed and written; SIGHUP leaves the job running and says where its report lands.
        for sig, name in ((signal.SIGINT, "killed"), (signal.SIGHUP, "hungup")):
            run = subprocess.Popen(["ip", "netns", "exec", hub, sys.executable, "-m", "lorastrap", "fleet", "slurm",
                                    *common, "--prefix", f"{envs}/{name}-%n", "--nodelist", "sn1"], cwd=ROOT,
                                   env={**env, "LORASTRAP_PAUSE_AT": "verify"}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            try:
                journal = envs / f"{name}-sn1.lorastrap-txn.json"
                deadline = time.monotonic() + 120
                while not (journal.exists() and "verifying" in journal.read_text()):
                    assert time.monotonic() < deadline and run.poll() is None, run.communicate()
                    time.sleep(0.2)
                jobid = json.loads((reports / "slurm-run.json").read_text())["job"]
                run.send_signal(sig)
                out, err = run.communicate(timeout=120)
            finally:
                run.kill()
            assert run.returncode == 130, err[-3000:]
            if sig == signal.SIGINT:
                assert "cancelling job" in err and f"interrupted: job {jobid} was cancelled" in out, err[-2000:]
                assert re.search(r"^sn1 +failed", out, re.M), out
                fleet = json.loads((reports / f"job-{jobid}" / "fleet.json").read_text())
                assert fleet["interrupted"] and "did not finish" in _rows(reports)["sn1"]["error"]
            else:
                assert f"job {jobid} keeps running" in err and f"job-{jobid}/fleet.json" in err, err[-2000:]
                assert _job_state(hub, env, jobid) in ("RUNNING", "COMPLETING")
                subprocess.run(["ip", "netns", "exec", hub, "scancel", jobid], env=env, check=True)


@pytest.fixture(scope="module")
def arm_bundle(channel, site):
    """test-cuda for linux-aarch64, bundled on this x86-64 machine: its aarch64 runtime wheels join the shared store."""
    return _make_bundle(channel, site / "cuda-arm-bundle", "test-cuda", "--platform", "linux-aarch64")


def test_bundle_for_nodes_no_runtime_wheel_fits(channel, tmp_path):
    """Bundling for Arm nodes whose glibc minimum is below what lorastrap's own runtime has wheels for (py-rattler
    0.28.0's only aarch64 glibc wheel is manylinux_2_28) says so, and how to fix it: not a network failure."""
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    vps = envs / "test-cuda.virtual-packages.yml"
    head, tail = vps.read_text().split("  linux-aarch64:\n")
    vps.write_text(head + "  linux-aarch64:\n" + tail.replace('__glibc: "2.28"', '__glibc: "2.17"'))
    res = _bundle_cli(channel, tmp_path / "out" / "b", "test-cuda", "--platform", "linux-aarch64", envs=envs)
    assert res.returncode == 4, res.stderr
    assert "no wheel of py-rattler==0.28.0 for linux-aarch64, glibc 2.17" in res.stderr, res.stderr
    assert "raise __glibc for linux-aarch64 in profile test-cuda's virtual-packages file" in res.stderr
    assert "reaches PyPI" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "b").exists()


@pytest.mark.slow
def test_slurm_fleet_with_an_x86_and_an_arm_partition(bundle, cuda_bundle, arm_bundle, tmp_path):
    """A cluster with an x86-64 partition and an Arm partition, provisioned from this x86-64 login node: one
    `fleet slurm` per partition (a Slurm job runs in one partition), each given every bundle (both platforms); each
    node plans over its own machine and takes the bundle of its profile and platform.

    The Arm nodes are recorded GH200 and GB200 machines in namespaces of this x86-64 machine: their linux-aarch64
    environments are linked here (the archives' subdir is checked), but nothing built for aarch64 can run on this
    CPU, so their run goes with --install-arg=--no-verify and their reports say "skipped": verifying an Arm node's
    environment is the Arm node's own step, not shown here.  (The test channel's aarch64 "python" is this machine's
    interpreter, so a verification would pass and prove nothing about Arm.)  The Arm run names its lorastrap
    command with --lorastrap, as the README's recipe does for the Arm partition's own runtime."""
    netns_slurm = _hosts_or_skip("netns_slurm", "Slurm fleet")
    cpu = _unpacked(bundle, tmp_path)
    machines = tmp_path / "machines"
    machines.mkdir()
    _recorded("h100-sxm_driver-550--cuda12", machines / "sn0.json")  # x86-64: test-cuda, linux-64
    # sn1 detects itself (this x86-64 machine, no GPU): test-cpu
    _recorded("gh200_driver-570--cuda12-aarch64", machines / "sn2.json")  # Arm: test-cuda, linux-aarch64
    _recorded("gb200-nvl72-tray_driver-580--cuda13-aarch64", machines / "sn3.json")
    envs, reports = tmp_path / "envs", tmp_path / "reports"
    common = ["--bundle", str(cpu), "--bundle", str(cuda_bundle), "--bundle", str(arm_bundle), "--report-dir",
              str(reports), "--machines", str(machines), "--pkgs-dir", str(tmp_path / "shared-pkgs"), "--time", "10",
              "--prefix", f"{envs}/lora-%n"]
    per_partition = {
        "x86": [],
        "arm": ["--install-arg=--no-verify",
                "--lorastrap", f"env PYTHONPATH={ROOT / 'installer'} {sys.executable} -m lorastrap"]}
    with netns_slurm.cluster(4, tmp_path / "slurm", {"x86": ["sn0", "sn1"], "arm": ["sn2", "sn3"]}) as (hub, _, env):
        env = {**env, "LORASTRAP_HOME": str(tmp_path / "login-home")}
        rows = {}
        for part, more in per_partition.items():
            res = _fleet_cli("slurm", *common, "--partition", part, *more, hub=hub, env=env)
            assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
            got = _rows(reports)
            assert set(got) == ({"sn0", "sn1"} if part == "x86" else {"sn2", "sn3"}), got
            rows.update(got)
    assert {h: (r["status"], r["profile"], r["verify"]) for h, r in rows.items()} == {
        "sn0": ("ok", "test-cuda", "pass"), "sn1": ("ok", "test-cpu", "pass"),
        "sn2": ("ok", "test-cuda", "skipped"), "sn3": ("ok", "test-cuda", "skipped")}, rows
    ids = {p: json.loads((p / "manifest.json").read_text()) for p in (cpu, cuda_bundle, arm_bundle)}
    assert [ids[p]["platform"] for p in (cpu, cuda_bundle, arm_bundle)] == ["linux-64", "linux-64", "linux-aarch64"]
    assert rows["sn2"]["bundle"] == rows["sn3"]["bundle"] != rows["sn0"]["bundle"] != rows["sn1"]["bundle"]
    for node, gpu in (("sn0", "H100"), ("sn2", "GH200"), ("sn3", "GB200")):
        assert gpu in json.dumps(rows[node]), (node, rows[node])
    for node, subdir in (("sn0", "linux-64"), ("sn1", "linux-64"), ("sn2", "linux-aarch64"), ("sn3", "linux-aarch64")):
        meta = json.loads(next((envs / f"lora-{node}" / "conda-meta").glob("pytorch-*.json")).read_text())
        assert meta["subdir"] == subdir, (node, meta.get("subdir"))


def test_fleet_node_without_a_bundle_for_its_plan(bundle, tmp_path):
    """A node whose machine plans a profile no bundle holds refuses, with the way out, and reports it."""
    import socket
    cpu = _unpacked(bundle, tmp_path)
    machines = tmp_path / "machines"
    machines.mkdir()
    _recorded("h100-sxm_driver-550--cuda12", machines / f"{socket.gethostname().split('.')[0]}.json")
    res = _fleet_cli("node", "--bundle", str(cpu), "--report-dir", str(tmp_path / "r"), "--machines", str(machines),
                     env={"LORASTRAP_HOME": str(tmp_path / "home")})
    assert res.returncode == 3, res.stderr
    assert "plans profile test-cuda on linux-64, and no bundle for it was given" in res.stderr
    assert "lorastrap bundle --profile test-cuda --platform linux-64" in res.stderr
    report = json.loads(next((tmp_path / "r").glob("*.json")).read_text())
    assert report["ok"] is False and report["exit_code"] == 3 and "no bundle for it" in report["error"]
    assert not (tmp_path / "home" / "nodes").exists() or not list((tmp_path / "home" / "nodes").rglob("conda-meta"))


def test_one_fleet_run_per_report_folder(bundle, tmp_path):
    """A second `fleet slurm` reporting into a folder a run is using is refused before it asks Slurm anything."""
    from lorastrap.core import locks
    cpu = _unpacked(bundle, tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    with locks.held(reports / ".fleet-run.lock", what="the test's run"):
        res = _fleet_cli("slurm", "--bundle", str(cpu), "--report-dir", str(reports), env={"PATH": str(tmp_path)})
    assert res.returncode == 8, res.stderr
    assert f"reports into {reports}" in res.stderr and "another --report-dir" in res.stderr


def test_a_bundle_the_machine_cannot_run_is_refused(cuda_bundle, tmp_path):
    """A CUDA 12 bundle on a node whose driver cannot run it (a recorded K80 node): refused, as `fleet` refuses it."""
    _recorded("k80_driver-470--cpu", tmp_path / "k80.json")
    res = run_cli("install", "--bundle", str(cuda_bundle), "--prefix", str(tmp_path / "env"), "--no-verify",
                  "--machine", str(tmp_path / "k80.json"), env={"LORASTRAP_HOME": str(tmp_path / "home")})
    assert res.returncode == 3, res.stderr
    assert "holds profile test-cuda, which this machine cannot run" in res.stderr
    assert "driver must support CUDA >= 12.0" in res.stderr and "--profile test-cuda" in res.stderr
    assert not (tmp_path / "env").exists()


@pytest.mark.slow
def test_fleet_refusals_before_anything_runs(bundle, cuda_bundle, tmp_path):
    cpu = _unpacked(bundle, tmp_path)
    res = _fleet_cli("slurm", "--bundle", str(cpu), "--bundle", str(cuda_bundle), "--report-dir", str(tmp_path / "r"),
                     "--prefix", str(tmp_path / "one-env"))
    assert res.returncode == 2 and "one shared prefix" in res.stderr and "%n" in res.stderr
    res = _fleet_cli("slurm", "--bundle", str(cpu), "--report-dir", str(tmp_path / "r"), "--profile", "test-cuda")
    assert res.returncode == 2 and "none of the bundles holds it" in res.stderr
    res = _fleet_cli("slurm", "--bundle", str(cpu), "--report-dir", str(tmp_path / "r"), env={"PATH": str(tmp_path)})
    assert res.returncode == 10 and "sinfo is not on PATH" in res.stderr and "Traceback" not in res.stderr


def test_plan_for_a_gpu_node_from_its_recorded_description(tmp_path):
    """From a login node without GPUs: plan with a node's `detect --json` (here a recorded H100 node's)."""
    _recorded("h100-sxm_driver-550--cuda12", tmp_path / "gpu07.json")
    res = run_cli("plan", "--machine", str(tmp_path / "gpu07.json"))
    assert res.returncode == 0 and res.stdout.startswith("profile: cuda12"), res.stderr
    (tmp_path / "bad.json").write_text("{}")
    res = run_cli("plan", "--machine", str(tmp_path / "bad.json"))
    assert res.returncode == 4 and "not a machine description" in res.stderr and "detect --json" in res.stderr


def test_a_warm_cache_does_not_mask_an_altered_bundle(bundle, tmp_path):
    b = _unpacked(bundle, tmp_path)
    env = {"LORASTRAP_HOME": str(tmp_path / "home")}
    res = run_cli("install", "--bundle", str(b), "--prefix", str(tmp_path / "env"), "--no-verify", env=env)
    assert res.returncode == 0, res.stderr  # the cache now holds every archive, checked
    victim = next((b / "channel" / "linux-64").glob("pytorch-*.conda"))
    data = bytearray(victim.read_bytes())
    data[-50] ^= 0xFF  # same size
    victim.write_bytes(bytes(data))
    res = run_cli("install", "--bundle", str(b), "--prefix", str(tmp_path / "env2"), "--no-verify", env=env)
    assert res.returncode == 6, res.stderr
    assert f"channel/linux-64/{victim.name} was altered" in res.stderr and not (tmp_path / "env2").exists()


@pytest.mark.slow
def test_many_installers_on_one_shared_cache_never_break_each_others_engine(engine, bundle, tmp_path):
    """Soak: six installers at once on one shared package cache, ten rounds.  A check of micromamba's unpacked
    copies while another installer's micromamba was unpacking one saw it incomplete and removed it, and that
    micromamba failed ("Cannot find a valid extracted directory cache"; ~1 round in 10 before the checks took
    micromamba's cache lock)."""
    b = _unpacked(bundle, tmp_path)
    for round_ in range(10):
        here = tmp_path / f"round{round_}"
        procs = []
        for i in range(6):
            env = dict(os.environ, LORASTRAP_HOME=str(here / f"node{i}"), LORASTRAP_PKGS_DIR=str(here / "shared"))
            procs.append(subprocess.Popen([sys.executable, "-m", "lorastrap", "install", "--bundle", str(b), "--prefix",
                                           str(here / f"env{i}"), "--json"], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(
            f"round {round_}, installer {i}: exit {p.returncode}\n{e[-4000:]}"
            for i, (p, (_, e)) in enumerate(zip(procs, outs)) if p.returncode)
        shutil.rmtree(here)
