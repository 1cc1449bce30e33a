"""install: the real embedded engine over the real test channel — transaction, crash recovery, integrity, locks."""

import fcntl
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dies_within, MAMBA, ROOT, run_cli

from lorastrap.install import engines

TEST_ENVS = ROOT / "tests" / "envs"


def install(channel, prefix, *args, env=None, envs_dir=TEST_ENVS):
    return run_cli("install", "--envs-dir", str(envs_dir), "--channel", channel["url"], "--pip-index-url",
                   channel["simple"], "--prefix", str(prefix), *args, env=env)


CUDA = {"CONDA_OVERRIDE_CUDA": "12.4"}


def smoke(prefix):
    """Run the packaged entry point (its #! line holds the prefix placeholder, replaced at install)."""
    res = subprocess.run([str(prefix / "bin" / "lora-smoke")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr + res.stdout
    return json.loads(res.stdout)


def assert_placeholders(prefix):
    assert (prefix / "bin" / "lora-smoke").read_text().splitlines()[0] == f"#!{prefix}/bin/python"
    assert f"prefix={prefix}\n" in (prefix / "etc" / "torch.conf").read_text()
    binary = next((prefix / "lib").glob("libtorch_*.so")).read_bytes()
    assert f"RPATH={prefix}/lib\0".encode() in binary
    assert b"/tmp/lorastrap-test-build/" not in binary


def meta_state(prefix):
    return sorted((p.name, p.stat().st_mtime_ns) for p in (prefix / "conda-meta").glob("*.json"))


def test_install_then_noop_then_switch_profile(channel, warm_home, tmp_path, engine):
    prefix = tmp_path / "env"
    user = tmp_path / "user"  # a user whose conda configuration would break an engine that read it
    user.mkdir()
    for rc in (".mambarc", ".condarc"):
        (user / rc).write_text("channels: [http://127.0.0.1:9/nowhere]\npkgs_dirs: [/nonexistent/pkgs]\n")
    res = install(channel, prefix, "--json", "--engine", engine,
                  env={"HOME": str(user), "CONDARC": str(user / ".condarc"), "MAMBA_ROOT_PREFIX": str(user / "mm")})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in user.iterdir()) == [".condarc", ".mambarc"]  # nothing registered or cached there
    out = json.loads(res.stdout)
    want = "embedded py-rattler 0." if engine == "rattler" else f"micromamba 1.5.12 ({MAMBA})"
    assert out["engine"].startswith(want), out["engine"]  # which engine and release ran, in the report
    assert json.loads((prefix / "conda-meta" / "lorastrap" / "record.json").read_text())["engine"] == out["engine"]
    assert out["profile"] == "test-cpu" and out["changed"] and out["verify"]["ok"]
    assert out["packages"] >= 30 and out["pip_packages"] == 1
    meta = list((prefix / "conda-meta").glob("*.json"))
    assert len(meta) == out["packages"]
    assert (prefix / "conda-meta" / "lorastrap" / "conda-lock.yml").exists()
    report = smoke(prefix)
    assert report["torch_build"] == "cpu" and report["prefix"] == str(prefix)
    assert_placeholders(prefix)
    assert list((prefix / "lib").glob("python3*/site-packages/lorastrap_testwheel/__init__.py"))
    assert not Path(str(prefix) + ".lorastrap-backup").exists()

    before = meta_state(prefix)
    res = install(channel, prefix, "--json", "--engine", engine)
    assert res.returncode == 0 and not json.loads(res.stdout)["changed"]
    assert "nothing to do" in res.stderr
    assert meta_state(prefix) == before

    res = install(channel, prefix, "--engine", engine, env=CUDA)  # a GPU node now: cuda builds replace cpu ones
    assert res.returncode == 0, res.stderr
    report = smoke(prefix)
    assert report["torch_build"] == "cuda" and report["bitsandbytes"] == "cuda"
    assert_placeholders(prefix)
    assert not list((prefix / "conda-meta").glob("pytorch-*cpu*.json"))


def test_tampered_archive_on_the_mirror_is_refused(channel, home, tmp_path):
    """Refused at the fetch step, before any engine runs: the same for every engine."""
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    before = meta_state(prefix)
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    res = run_cli("lock", "--envs-dir", str(envs), "--profile", "test-cuda", "--platform", "linux-64",
                  "--channel", channel["url"])
    assert res.returncode == 0, res.stderr
    mirror = tmp_path / "mirror"
    shutil.copytree(channel["dir"], mirror)
    victim = next((mirror / "linux-64").glob("pytorch-*cuda*.conda"))
    victim.write_bytes(victim.read_bytes()[:-100] + b"\0" * 100)
    import testchannel
    server, url = testchannel.serve(mirror)
    try:
        for where in (url, mirror.as_uri()):  # over HTTP, and over file:// (py-rattler alone would not check)
            res = run_cli("install", "--envs-dir", str(envs), "--mirror", where, "--prefix", str(prefix),
                          "--frozen", env=CUDA)
            assert res.returncode == 6, res.stderr
            assert "checksum mismatch" in res.stderr and "want sha256" in res.stderr and "got " in res.stderr
            assert victim.name in res.stderr and "Traceback" not in res.stderr
            assert meta_state(prefix) == before and smoke(prefix)["torch_build"] == "cpu"
    finally:
        server.shutdown()
    # The untampered mirror works with the same lock (URLs rewritten consistently).
    res = run_cli("install", "--envs-dir", str(envs), "--mirror", channel["dir"].as_uri(), "--prefix", str(prefix),
                  "--frozen", env=CUDA)
    assert res.returncode == 0, res.stderr
    assert smoke(prefix)["torch_build"] == "cuda"


def _start(channel, prefix, stage, env):
    full = dict(os.environ, LORASTRAP_PAUSE_AT=stage, **env)
    return subprocess.Popen([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS),
                             "--channel", channel["url"], "--pip-index-url", channel["simple"],
                             "--prefix", str(prefix)], cwd=ROOT, env=full, stderr=subprocess.PIPE, text=True)


def _wait_for_pause(proc, stage, timeout=60):
    start = time.monotonic()
    seen = []
    while time.monotonic() - start < timeout:
        line = proc.stderr.readline()
        seen.append(line)
        if f"paused at {stage}" in line:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"never paused at {stage}: {''.join(seen)}")


def _usable_or_restorable(prefix):
    """Right after a SIGKILL: either PREFIX works, or the backup (complete) is there for the next run."""
    backup = Path(str(prefix) + ".lorastrap-backup")
    if backup.exists():
        assert (backup / "bin" / "lora-smoke").exists()
        return "backup"
    smoke(prefix)
    return "prefix"


NO_MAMBA = pytest.mark.skipif(MAMBA is None,
                              reason="no micromamba (not at ../shared/tools/micromamba/bin, MAMBA_EXE or on PATH)")


# Stages before the link step run the same code whatever the engine: micromamba runs the stages after it.
@pytest.mark.parametrize("stage,final,engine", [
    ("download", "cpu", "rattler"), ("aside", "cpu", "rattler"), ("linked", "cpu", "rattler"),
    ("verify", "cpu", "rattler"), ("commit", "cuda", "rattler"), pytest.param("linked", "cpu", "micromamba", marks=NO_MAMBA),
    pytest.param("commit", "cuda", "micromamba", marks=NO_MAMBA)], indirect=["engine"])
def test_sigkill_at_any_stage_never_loses_the_previous_environment(channel, warm_home, tmp_path, engine, stage, final):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0  # the previous environment: cpu builds
    proc = _start(channel, prefix, stage, CUDA)
    _wait_for_pause(proc, stage)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _usable_or_restorable(prefix)
    # The next run (same machine, no cuda override) recovers first, then converges.
    res = install(channel, prefix)
    assert res.returncode == 0, res.stderr
    if stage != "download":  # killed after the journal was written: the next run says what it found and did
        assert "an earlier run was" in res.stderr, res.stderr
    assert smoke(prefix)["torch_build"] == "cpu"
    assert_placeholders(prefix)
    assert not Path(str(prefix) + ".lorastrap-backup").exists()
    assert not Path(str(prefix) + ".lorastrap-txn.json").exists()
    assert not list(tmp_path.glob("env.lorastrap-trash-*"))
    # And re-running the interrupted install converges to what it was installing.
    res = install(channel, prefix, env=CUDA)
    assert res.returncode == 0 and smoke(prefix)["torch_build"] == "cuda"


def test_sigkill_at_commit_completes_on_the_next_run(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    proc = _start(channel, prefix, "commit", CUDA)
    _wait_for_pause(proc, "commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = install(channel, prefix, env=CUDA)  # finishes the commit; the environment is already the new one
    assert res.returncode == 0, res.stderr
    assert "was committing" in res.stderr and "finishing it" in res.stderr
    assert smoke(prefix)["torch_build"] == "cuda"
    assert not Path(str(prefix) + ".lorastrap-backup").exists()


def test_sigkill_while_the_engine_links(channel, warm_home, tmp_path):
    """Killed with half the packages linked: the engine's worker pauses there (LORASTRAP_PAUSE_AT=mid-link) and
    leaves a marker, so the kill lands inside the link step every time."""
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    proc = _start(channel, prefix, "mid-link", CUDA)
    marker = Path(str(prefix) + ".paused-mid-link")
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the engine never reached the middle of linking"
    worker = int(marker.read_text())
    linked = len(list((prefix / "conda-meta").glob("*.json")))
    assert 0 < linked and Path(str(prefix) + ".lorastrap-backup").exists()  # old env aside, new one half made
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dies_within(worker, 10), "the engine's worker outlived the killed install"  # death signal
    assert Path(str(prefix) + ".lorastrap-txn.json").exists()  # killed inside the transaction
    assert _usable_or_restorable(prefix)
    marker.unlink()
    res = install(channel, prefix)
    assert res.returncode == 0, res.stderr
    assert smoke(prefix)["torch_build"] == "cpu"
    assert_placeholders(prefix)


@NO_MAMBA
def test_sigkill_while_micromamba_links(channel, warm_home, tmp_path, monkeypatch):
    """Killed while micromamba is linking (its first conda-meta record is there): micromamba dies with lorastrap
    (death signal) and the next run restores the previous environment."""
    import psutil
    monkeypatch.setenv("MAMBA_EXE", str(MAMBA))
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS), "--channel",
                             channel["url"], "--pip-index-url", channel["simple"], "--prefix", str(prefix),
                             "--engine", "micromamba"], cwd=ROOT, env=dict(os.environ, **CUDA),
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    mm = None
    while time.monotonic() < deadline and proc.poll() is None:
        kids = []
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "micromamba" in c.name():
                    kids.append(c)
            except psutil.NoSuchProcess:  # a short-lived child (uname, ldconfig) that ended meanwhile
                pass
        if kids and list((prefix / "conda-meta").glob("*.json")) and Path(str(prefix) + ".lorastrap-backup").exists():
            mm = kids[0].pid
            break
        time.sleep(0.005)
    assert mm is not None, "never caught micromamba linking"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dies_within(mm, 10), "micromamba outlived the killed install"
    assert Path(str(prefix) + ".lorastrap-txn.json").exists() and _usable_or_restorable(prefix) == "backup"
    res = install(channel, prefix, "--engine", "micromamba")
    assert res.returncode == 0, res.stderr
    assert smoke(prefix)["torch_build"] == "cpu"
    assert_placeholders(prefix)



def test_sigterm_rolls_back_at_once(channel, warm_home, tmp_path, engine):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    proc = _start(channel, prefix, "verify", CUDA)
    _wait_for_pause(proc, "verify")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "restoring the previous environment" in err and "Traceback" not in err
    assert smoke(prefix)["torch_build"] == "cpu"
    assert not Path(str(prefix) + ".lorastrap-txn.json").exists()


def test_a_second_installer_waits_or_fails_fast(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lockfile = Path(str(prefix) + ".lorastrap.lock")
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another lorastrap holds the prefix
    try:
        res = install(channel, prefix, "--no-wait")
        assert res.returncode == 8 and "locked by another lorastrap run" in res.stderr
        proc = subprocess.Popen([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS),
                                 "--channel", channel["url"], "--pip-index-url", channel["simple"],
                                 "--prefix", str(prefix)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        while line and "waiting for another lorastrap run" not in line:
            line = proc.stderr.readline()
        assert "waiting" in line
        assert proc.poll() is None
    finally:
        os.close(fd)  # release: the waiting installer proceeds
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    smoke(prefix)


def test_two_concurrent_installs_of_one_prefix(channel, warm_home, tmp_path, engine):
    prefix = tmp_path / "env"
    cmd = [sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"],
           "--pip-index-url", channel["simple"], "--prefix", str(prefix), "--json"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    changed = sorted(json.loads(o)["changed"] for o, _ in outs)
    assert changed == [False, True]  # one installed, the other waited and found nothing to do
    smoke(prefix)
    assert_placeholders(prefix)


def test_not_enough_disk_is_refused_before_any_change(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    before = meta_state(prefix)
    free_mib = shutil.disk_usage(tmp_path).free // 2**20
    res = install(channel, prefix, "--min-free-mib", str(free_mib + 10), env=CUDA)
    assert res.returncode == 7, res.stderr
    assert "not enough free disk" in res.stderr and "Nothing was changed" in res.stderr
    # Here the package cache's disk is the first found short (the same disk as the prefix's): the message names it.
    assert re.search(r"Free space on the disk that holds \S+/pkgs \(mounted at /", res.stderr), res.stderr
    assert "point LORASTRAP_PKGS_DIR (or LORASTRAP_HOME) at a larger disk" in res.stderr
    assert meta_state(prefix) == before and smoke(prefix)["torch_build"] == "cpu"


def test_a_full_prefix_disk_names_that_disk_not_the_data_dir(tmp_path):
    from lorastrap.core.errors import DiskError
    from lorastrap.install import transaction
    with pytest.raises(DiskError) as exc:
        transaction._check_disk(tmp_path / "envs", 0, 2**62, str(tmp_path / "envs"),
                                fix_where="choose a --prefix on a larger disk")
    assert f"the disk that holds {tmp_path} (mounted at /" in exc.value.fix and "LORASTRAP_HOME" not in exc.value.fix
    assert "choose a --prefix on a larger disk" in exc.value.fix


def test_a_folder_that_is_not_an_environment_is_never_replaced(channel, warm_home, tmp_path):
    prefix = tmp_path / "work"
    prefix.mkdir()
    (prefix / "thesis.tex").write_text("precious")
    res = install(channel, prefix)
    assert res.returncode == 2 and "is not a conda environment" in res.stderr
    assert (prefix / "thesis.tex").read_text() == "precious" and not Path(str(prefix) + ".lorastrap-backup").exists()


def test_unreachable_channel_on_install(home, tmp_path):
    res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", "http://127.0.0.1:9/none",
                  "--prefix", str(tmp_path / "env"))
    assert res.returncode == 5 and "--mirror" in res.stderr and not (tmp_path / "env").exists()


def test_failed_verification_restores_the_previous_environment(channel, warm_home, tmp_path, engine):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    text = (envs / "profiles.yaml").read_text()
    (envs / "profiles.yaml").write_text(text.replace("verify: [lora-smoke, --expect-cuda]", "verify: [python, -c, 'raise SystemExit(3)']"))
    res = install(channel, prefix, env=CUDA, envs_dir=envs)
    assert res.returncode == 9, res.stderr
    assert "failed verification" in res.stderr and "restoring the previous environment" in res.stderr
    assert smoke(prefix)["torch_build"] == "cpu"
    assert_placeholders(prefix)


def test_failed_verification_of_a_first_install_says_there_was_nothing_to_restore(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    text = (envs / "profiles.yaml").read_text()
    (envs / "profiles.yaml").write_text(text.replace("verify: [lora-smoke]", "verify: [python, -c, 'raise SystemExit(3)']"))
    res = install(channel, prefix, envs_dir=envs)
    assert res.returncode == 9, res.stderr
    assert "the previous environment was restored" not in res.stderr
    assert f"there was no environment at {prefix} before, and the new one was removed" in res.stderr
    assert not prefix.exists()


def test_keep_backup(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    assert install(channel, prefix).returncode == 0
    assert install(channel, prefix, "--keep-backup", env=CUDA).returncode == 0
    backup = Path(str(prefix) + ".lorastrap-backup")
    assert backup.exists() and (backup / "conda-meta").exists()


# --- micromamba / mamba -----------------------------------------------------------------------------------------

def test_micromamba_command_is_isolated_and_uses_a_lock_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDA_PREFIX", "/somewhere")
    monkeypatch.setenv("MAMBA_ROOT_PREFIX", "/users/own")
    eng = engines.Engine("micromamba", "/opt/bin/micromamba")
    argv, env = engines.mamba_command(eng, tmp_path / "env", tmp_path / "x.linux-64.conda-lock.yml", tmp_path / "root")
    assert argv == ["/opt/bin/micromamba", "create", "--yes", "--no-rc", "--root-prefix", str(tmp_path / "root"),
                    "--prefix", str(tmp_path / "env"), "--file", str(tmp_path / "x.linux-64.conda-lock.yml")]
    assert env["MAMBA_ROOT_PREFIX"] == str(tmp_path / "root") and "CONDA_PREFIX" not in env
    with pytest.raises(ValueError):
        engines.mamba_command(eng, tmp_path / "env", tmp_path / "x.yml", tmp_path / "root")


def test_engine_auto_skips_shims_and_falls_back_to_rattler(tmp_path, monkeypatch):
    shims = tmp_path / ".pyenv" / "shims"
    shims.mkdir(parents=True)
    fake = shims / "micromamba"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}:/usr/bin:/bin")
    monkeypatch.delenv("MAMBA_EXE", raising=False)
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    assert engines.find("auto").kind == "rattler"
    with pytest.raises(Exception) as info:
        engines.find("micromamba")
    assert "no usable micromamba found" in str(info.value)


def _from_a_removed_folder(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    gone = tmp_path / "gone"
    gone.mkdir()
    return subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone), *argv],
                          capture_output=True, text=True, timeout=120)


def test_an_install_from_a_current_folder_that_was_removed(channel, warm_home, tmp_path):
    """Run from a folder removed meanwhile (a user still in an environment's folder after `lorastrap remove`):
    os.getcwd() fails there, and uv refused to start ("Current directory does not exist"); lorastrap's own
    children and uv get folders of their own."""
    args = ("install", "--envs-dir", str(ROOT / "tests" / "envs"), "--channel", channel["url"], "--pip-index-url",
            channel["simple"], "--engine", "rattler", "--no-verify", "--json", "--prefix", str(tmp_path / "env"))
    res = _from_a_removed_folder(tmp_path, sys.executable, "-m", "lorastrap", *args)
    assert res.returncode == 0 and json.loads(res.stdout)["changed"], res.stderr[-2000:]


def test_a_lock_and_a_conda_version_from_a_current_folder_that_was_removed(channel, home, tmp_path):
    """py-rattler 0.28 asks for the current folder when it is imported (ChannelConfig's default root_dir): from a
    removed one, `lorastrap lock` said it "could not read the channel(s)" (FileNotFoundError) and told the user to
    check the network.  Imported from / there (core.fsutil.sound_cwd), and the folder given back."""
    out = tmp_path / "out.conda-lock.yml"
    res = _from_a_removed_folder(tmp_path, sys.executable, "-m", "lorastrap", "lock", "--envs-dir",
                                 str(ROOT / "tests" / "envs"), "--profile", "test-cpu", "--platform", "linux-64",
                                 "--channel", channel["url"], "--pip-index-url", channel["simple"], "-o", str(out))
    assert res.returncode == 0 and out.is_file(), res.stderr[-2000:]
    code = ("import os; from lorastrap.core import versions; print(versions.compare('1.10', '1.9'), "
            "os.path.exists('.'), os.stat('.').st_nlink)")
    res = _from_a_removed_folder(tmp_path, sys.executable, "-c", code)
    assert res.returncode == 0 and res.stdout.split() == ["1", "True", "0"], res.stderr[-2000:]  # still there


def test_a_relative_path_from_a_removed_current_folder_is_a_usage_error(home, tmp_path):
    """A relative --prefix cannot be resolved from a removed current folder: said as such (exit 2, what, why, fix;
    the JSON document with --json), not as an internal error."""
    res = _from_a_removed_folder(tmp_path, sys.executable, "-m", "lorastrap", "install", "--envs-dir",
                                 str(ROOT / "tests" / "envs"), "--prefix", "relative-env", "--no-verify", "--json")
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "the current folder no longer exists" in res.stderr and "Traceback" not in res.stderr
    assert "internal error" not in res.stderr and "cd to a folder that exists" in res.stderr
    assert json.loads(res.stdout)["exit_code"] == 2
