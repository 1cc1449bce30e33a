"""What a new user meets in the first hour: environments that remember how they were built, fix lines that run as
printed, --frozen without a committed lock, generations that repair does not drop silently — the real CLI, the
real engine, the test channel on loopback."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

TEST_ENVS = ROOT / "tests" / "envs"


@pytest.fixture
def envs_copy(tmp_path):
    """The test profiles in a folder of their own (as a user's --envs-dir would be)."""
    out = tmp_path / "my-envs"
    shutil.copytree(TEST_ENVS, out)
    return out


def test_environment_remembers_how_it_was_built(channel, warm_home, envs_copy, tmp_path):
    prefix = tmp_path / "env"
    res = run_cli("install", "--envs-dir", str(envs_copy), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "--prefix", str(prefix), "--no-verify", "--link-mode", "copy",
                  "--engine", "rattler")
    assert res.returncode == 0, res.stderr
    built = json.loads((prefix / "conda-meta" / "lorastrap" / "record.json").read_text())["built_with"]
    assert built == {"envs_dir": str(envs_copy), "channels": [channel["url"]], "mirror": channel["url"],
                     "pip_index_url": channel["simple"], "engine": "rattler", "link_mode": "copy"}
    # update with no flag: the profile (only in envs_copy), the channel and the index are the environment's own
    res = run_cli("update", "--prefix", str(prefix), "--dry-run", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["changes"] == [] and f"--envs-dir {envs_copy}" in res.stderr
    assert f"--pip-index-url {channel['simple']}" in res.stderr and "--link-mode copy" in res.stderr
    # doctor and verify read the profiles it was built from
    res = run_cli("doctor", "--prefix", str(prefix), "--no-imports", "--json", cwd=tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout)["profile"] == "test-cpu", res.stdout + res.stderr
    # a flag given now wins: an index without the pip entry is named as the cause, with the fix
    empty = channel["base"] + "/channel/"  # an index with no lorastrap-testwheel
    res = run_cli("update", "--prefix", str(prefix), "--dry-run", "--pip-index-url", empty, "--json", cwd=tmp_path)
    assert res.returncode == 4, res.stderr
    err = json.loads(res.stdout)
    assert empty in err["what"] and "lorastrap-testwheel" in err["what"], err
    assert err["fix"].startswith("Pass --pip-index-url") and "conda side" not in err["fix"], err
    # repair rebuilds with the recorded link mode: the files are the environment's own, not the cache's
    res = run_cli("repair", "--prefix", str(prefix), "--yes", "--no-verify", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "--link-mode copy" in res.stderr
    some = next(p for p in (prefix / "lib").rglob("*.py"))
    assert os.stat(some).st_nlink == 1, some


# --- fix lines that run as printed ----------------------------------------------------------------------------

def _quoted_commands(text: str) -> list[str]:
    import re
    return re.findall(r"`([^`]*lorastrap[^`]*)`", text)


def test_doctor_fix_line_runs_as_printed(channel, warm_home, envs_copy, tmp_path):
    import subprocess
    prefix = tmp_path / "env"
    res = run_cli("install", "--envs-dir", str(envs_copy), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "--prefix", str(prefix), "--no-verify")
    assert res.returncode == 0, res.stderr
    script = Path(sys.executable).parent / "lorastrap"  # the console script, not on the PATH here
    env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                 if Path(p).absolute() != script.parent.absolute()))
    assert "run in it:   " + str(script) + " run --prefix" in res.stdout or "-m lorastrap run --prefix" in res.stdout
    (prefix / "lib" / "python3.11" / "site-packages" / "accelerate" / "__init__.py").unlink()
    res = subprocess.run([str(script), "doctor", "--prefix", str(prefix), "--no-imports"], capture_output=True,
                         text=True, env=env, cwd=tmp_path / "..")
    assert res.returncode == 11, res.stdout + res.stderr
    fixes = _quoted_commands(res.stdout)
    assert fixes and all(f.startswith(f"{script} repair --prefix {prefix}") for f in fixes), fixes
    # run the printed fix exactly as printed, from another folder, on a terminal (repair asks; answered y), then
    # doctor's own verdict is healthy
    res = subprocess.run(["script", "-qec", fixes[-1] + "; echo rc=$?", "/dev/null"], input="y\n",
                         capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert "rc=0" in res.stdout, res.stdout
    res = subprocess.run([str(script), "doctor", "--prefix", str(prefix), "--no-imports"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and "verdict: healthy" in res.stdout, res.stdout


def test_the_command_is_named_as_the_user_runs_it(tmp_path):
    import subprocess
    script = Path(sys.executable).parent / "lorastrap"
    probe = "from lorastrap.core import invocation as i; i.set_where(['--name', 'x']); " \
            "print(i.runnable('run `lorastrap repair` or `lorastrap run -- python t.py`, `lorastrap list`'))"
    bare = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p).absolute() != script.parent.absolute()]
    for path, argv0, want in ((bare, str(script), str(script)), ([str(script.parent)] + bare, str(script), "lorastrap"),
                              (bare, "-c", f"{sys.executable} -m lorastrap")):
        code = f"import sys; sys.argv[0] = {argv0!r}; " + probe
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, PATH=os.pathsep.join(path)))
        assert res.stdout.strip() == (f"run `{want} repair --name x` or `{want} run --name x -- python t.py`, "
                                      f"`{want} list`"), (path, res.stdout, res.stderr)


# --- --frozen without a committed lock ------------------------------------------------------------------------

def test_frozen_without_a_committed_lock_has_its_own_code_and_a_users_fix(home, envs_copy, tmp_path):
    from lorastrap.core import errors
    assert not list(envs_copy.glob("*.conda-lock.yml")) and not list((ROOT / "envs").glob("*.conda-lock.yml"))
    res = run_cli("install", "--envs-dir", str(envs_copy), "--frozen", "--prefix", str(tmp_path / "env"), "--json")
    assert res.returncode == errors.NO_LOCK == 19, res.stderr
    err = json.loads(res.stdout)
    assert err["exit_code"] == 19 and err["error"] == "NoLockError"
    assert "no committed lock for profile test-cpu on linux-64" in err["what"]
    assert err["fix"].startswith("Drop --frozen: lorastrap then locks test-cpu") and "Traceback" not in res.stderr
    assert not (tmp_path / "env").exists()
    readme = (ROOT / "README.md").read_text()
    assert "| 19 | `install --frozen`" in readme and "Today no lock is committed" in readme
    assert "19 --frozen without a committed lock" in (ROOT / "setup.sh").read_text()


# --- generations: repair keeps them; list shows each one's lock and health -----------------------------------

def _row(prefix):
    res = run_cli("list", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = [r for r in json.loads(res.stdout)["environments"] if r["prefix"] == str(prefix)]
    return row


def test_repair_keeps_updates_generation_and_list_shows_each_ones_lock_and_health(growing_channel, warm_home,
                                                                                   tmp_path):
    ch, prefix = growing_channel, tmp_path / "env"
    res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", ch["url"], "--pip-index-url", ch["simple"],
                  "--prefix", str(prefix), "--no-verify")
    assert res.returncode == 0, res.stderr
    first = _row(prefix)["lock_digest"]
    assert f"lock {first[:12]}" in run_cli("list").stdout
    ch["publish"]("peft", "0.22.0")
    res = run_cli("update", "--prefix", str(prefix), "--no-verify")  # the envs dir and sources: the record's
    assert res.returncode == 0, res.stderr
    row = _row(prefix)
    assert row["lock_digest"] != first and f"lock {row['lock_digest'][:12]}" in run_cli("list").stdout
    (gen,) = row["generations"]
    assert gen["lock_digest"] == first and gen["health"] == "ok"
    # damage the current environment, then repair it: update's generation stays generation 1
    (prefix / "lib" / "python3.11" / "site-packages" / "accelerate" / "__init__.py").unlink()
    res = run_cli("repair", "--prefix", str(prefix), "--yes", "--no-verify")
    assert res.returncode == 0, res.stderr
    assert "replacing the older backup" not in res.stderr
    assert "the 1 kept generation(s) stay, and `" in res.stderr and f"rollback --prefix {prefix}` still returns to " \
        f"{prefix}.lorastrap-backup" in res.stderr, res.stderr
    row = _row(prefix)
    assert row["health"] == "ok" and [g["lock_digest"] for g in row["generations"]] == [first]
    assert [g["health"] for g in row["generations"]] == ["ok"]
    text = run_cli("list").stdout
    assert f"{prefix}.lorastrap-backup: lock {first[:12]}" in text and "health: ok" in text, text
    res = run_cli("rollback", "--prefix", str(prefix))
    assert res.returncode == 0 and "downgraded peft" in res.stdout, res.stdout + res.stderr
    assert _row(prefix)["lock_digest"] == first


# --- trying it here: one command --------------------------------------------------------------------------------

def test_try_sh_serves_on_a_free_port_installs_and_stops_the_server(tmp_path):
    import re
    import socket
    import subprocess
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTRAP_")}
    env.update(LORASTRAP_TRY_HOME=str(tmp_path / "try"), LORASTRAP_TRY_PYTHON=sys.executable, CONDA_OVERRIDE_CUDA="")
    res = subprocess.run(["sh", str(ROOT / "scripts" / "try.sh")], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"installed and verified: {tmp_path / 'try' / 'lora'} (profile test-cpu" in res.stdout, res.stdout
    (port,) = re.findall(r"serving the test channel at http://127\.0\.0\.1:(\d+)/channel", res.stderr)
    assert "try: server stopped" in res.stderr
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", int(port))) != 0
    # the printed hint runs as printed
    (hint,) = [ln.split("run in it:", 1)[1].strip() for ln in res.stdout.splitlines() if ln.startswith("run in it:")]
    assert hint.endswith(" -- python train.py")
    run = subprocess.run(["sh", "-c", hint.replace("python train.py", "python -c 'import peft; print(\"ok\")'")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


# --- small untruths -------------------------------------------------------------------------------------------

def test_why_not_lists_every_rule_with_its_source_even_without_a_gpu():
    import yaml
    res = run_cli("plan", "--why-not", "cuda12", env={"CONDA_OVERRIDE_CUDA": ""})
    assert res.returncode == 0, res.stderr
    rules = [ln for ln in res.stdout.splitlines() if ln.startswith("  [") and "] platform " not in ln]
    sources = [ln for ln in res.stdout.splitlines() if ln.startswith("      source: ")]
    assert len(rules) == len(sources), res.stdout  # every rule, met or not, with its source
    text = res.stdout
    assert "compute capability must be in 5.0..12.9 (not judged: no usable NVIDIA GPU here)" in text
    assert "needs >= 4096 MiB (not judged: no usable NVIDIA GPU here)" in text
    req = yaml.safe_load((ROOT / "envs" / "profiles.yaml").read_text())["profiles"]["cuda12"]["requires"]
    for rule in req.values():
        for r in rule if isinstance(rule, list) else [rule]:
            assert " ".join(r["source"].split())[:60] in " ".join(text.split()), r["source"]


def test_diff_locks_counts_an_empty_old_file_as_empty(channel, home, tmp_path):
    import subprocess
    new = tmp_path / "new.conda-lock.yml"
    res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                  "--channel", channel["url"], "--pip-index-url", channel["simple"], "--output", str(new))
    assert res.returncode == 0, res.stderr
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    for old in (str(empty), "/dev/null", str(tmp_path / "missing.yml")):
        res = run_cli("diff-locks", old, str(new), "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["linux-64"]["added"], res.stdout
    # the README's recipe for a lock never committed: `diff-locks <(git show HEAD:envs/P.conda-lock.yml) NEW`
    res = subprocess.run(["bash", "-c", f'"{sys.executable}" -m lorastrap diff-locks '
                          f'<(git show HEAD:envs/test-cpu.conda-lock.yml 2>/dev/null) {new}'],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "linux-64: " in res.stdout and " added" in res.stdout, res.stderr
    res = subprocess.run(["bash", "-c", f'"{sys.executable}" -m lorastrap diff-locks <(cat {new}) {new}'],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "linux-64: no change" in res.stdout, res.stderr


def test_verify_text_gives_the_reason_and_json_exit_code_is_the_processes(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "--prefix", str(prefix), "--no-verify")
    assert res.returncode == 0, res.stderr
    # the test channel's torch is a stand-in: the full verification script cannot run there (an error verdict)
    text = run_cli("verify", "--prefix", str(prefix))
    assert text.returncode == 9 and "verdict: ERROR" in text.stdout
    assert "error: AttributeError" in text.stdout, text.stdout
    res = run_cli("verify", "--prefix", str(prefix), "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == doc["exit_code"] == 9 and doc["script_exit_code"] == 4 and doc["error"]


def test_doctor_text_verdict_is_its_json_verdict():
    from lorastrap.care import doctor
    from lorastrap.core.errors import Finding
    for kind in ("venv", "conda"):
        for severity, repair, want in (("error", "rebuild", "repairable"), ("error", "replan", "not-repairable")):
            diag = doctor.Diagnosis(prefix="/x", profile=None, lock=None, kind=kind, python="/x/bin/python")
            diag.findings.append(Finding(severity=severity, code="c", what="w", repair=repair))
            assert diag.verdict == want
            assert doctor.format_diagnosis(diag).splitlines()[-1].startswith(f"verdict: {want} "), kind


@pytest.mark.skipif(not shutil.which("script"), reason="needs script(1) for a terminal")
def test_declining_uninstall_is_not_an_interruption(tmp_path):
    import shlex
    import subprocess
    prefix = tmp_path / "env"
    (prefix / "conda-meta" / "lorastrap").mkdir(parents=True)
    (prefix / "conda-meta" / "lorastrap" / "record.json").write_text("{}")  # lorastrap's: it may remove it, if asked
    env = dict(os.environ, LORASTRAP_HOME=str(tmp_path / "home"))
    cmd = f"{shlex.quote(sys.executable)} -m lorastrap uninstall --prefix {shlex.quote(str(prefix))}; echo rc=$?"
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], input="n\n", capture_output=True, text=True,
                         env=env, timeout=120)
    assert "rc=2" in res.stdout and "declined" in res.stdout and "interrupted" not in res.stdout, res.stdout
    assert prefix.exists()


@pytest.mark.skipif(not shutil.which("script"), reason="needs script(1) for a terminal")
def test_the_embedded_engines_progress_bar_ends_its_line(channel, warm_home, tmp_path):
    import shlex
    import subprocess
    cmd = " ".join(shlex.quote(a) for a in [
        sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"],
        "--pip-index-url", channel["simple"], "--prefix", str(tmp_path / "env"), "--no-verify", "--engine", "rattler"])
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert "installed: " in res.stdout, res.stdout[-2000:]
    assert "installing packages" in res.stdout  # py-rattler drew its bar on the terminal
    lines = res.stdout.replace("\r\n", "\n").split("\n")
    assert any(ln.startswith("lorastrap: installing 1 pip entry") for ln in lines), res.stdout[-2000:]


# --- tests never write outside their temporary HOME -----------------------------------------------------------

def test_the_tests_run_with_a_temporary_home_and_a_changed_real_home_is_noticed(tmp_path):
    import subprocess
    from conftest import REAL_HOME, home_snapshot
    assert Path(os.environ["HOME"]) != REAL_HOME and os.environ["HOME"] == os.environ["LORASTRAP_TEST_HOME"]
    child = subprocess.run([sys.executable, "-c", "import pathlib, os; print(pathlib.Path.home()); "
                            "print(os.environ['XDG_DATA_HOME']); print(os.environ['XDG_CONFIG_HOME'])"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(not p.startswith(str(REAL_HOME) + "/") and p != str(REAL_HOME) for p in child), child
    fake = tmp_path / "home"
    (fake / ".config" / "fish").mkdir(parents=True)
    before = home_snapshot(fake)
    (fake / ".conda").mkdir()
    (fake / ".conda" / "environments.txt").write_text("/tmp/env\n")
    (fake / ".config" / "fish" / "config.fish").write_text("# added\n")
    after = home_snapshot(fake)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {str(fake / ".conda" / "environments.txt"), str(fake / ".config" / "fish" / "config.fish")} <= changed
