"""Day two: run / shell-hook / shell in real shells, list, update with a diff, rollback, uninstall — real
processes, real signals, the real engine over the test channel."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

TEST_ENVS = ROOT / "tests" / "envs"
LORASTRAP = f"{sys.executable} -m lorastrap"


def _install(channel, prefix, *args, env=None):
    return run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                   channel["simple"], "--prefix", str(prefix), "--no-verify", *args, env=env)


@pytest.fixture(scope="module")
def installed(channel, session_state, tmp_path_factory):
    """One test-cpu environment for the tests that only use it (its own data dir, warm from the session)."""
    root = tmp_path_factory.mktemp("day-two")
    home = root / "home"
    shutil.copytree(session_state / "locks", home / "locks")
    shutil.copytree(session_state / "pkgs" / "archives", home / "pkgs" / "archives", copy_function=os.link)
    env = {"LORASTRAP_HOME": str(home)}
    res = _install(channel, root / "env", env=env)
    assert res.returncode == 0, res.stderr
    return {"prefix": root / "env", "env": env}


SHELLS = {  # shell → how it evaluates the hook, then uses the environment
    "bash": ["bash", "-c", 'eval "$({ls} shell-hook --prefix {p} --shell bash)"; {use}'],
    "dash": ["dash", "-c", 'eval "$({ls} shell-hook --prefix {p} --shell posix)"; {use}'],
    "zsh": ["zsh", "-c", 'eval "$({ls} shell-hook --prefix {p} --shell zsh)"; {use}'],
    "fish": ["fish", "-c", "{ls} shell-hook --prefix {p} --shell fish | source; {use}"],
}
USE = 'python -c "import sys; print(sys.prefix)"; lora-smoke; echo "data=$LORA_SMOKE_DATA"'


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_shell_hook_activates_in_each_shell(installed, shell):
    if not shutil.which(shell):
        if os.environ.get("CI"):
            pytest.fail(f"{shell} is not installed (.ci/run installs it from Debian)")
        pytest.skip(f"{shell} is not installed")
    prefix = installed["prefix"]
    argv = SHELLS[shell][:-1] + [SHELLS[shell][-1].format(ls=LORASTRAP, p=prefix, use=USE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONDA")}
    env.update(installed["env"], PATH="/usr/bin:/bin")
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == str(prefix)  # the environment's Python, first on PATH
    assert json.loads(lines[1])["prefix"] == str(prefix)  # a packaged executable
    assert lines[2] == f"data={prefix}/share/lora-smoke"  # set by the package's activate.d script


def test_run_passes_stdin_stdout_exit_code_and_activation(installed):
    code = ("import os, sys; print(sys.stdin.read().upper(), os.environ['LORA_SMOKE_DATA'], os.environ['CONDA_PREFIX'],"
            " sys.prefix); sys.exit(7)")
    res = subprocess.run([sys.executable, "-m", "lorastrap", "run", "--prefix", str(installed["prefix"]), "--",
                          "python", "-c", code], input="hello", capture_output=True, text=True, timeout=60,
                         env={**os.environ, **installed["env"]})
    p = installed["prefix"]
    assert res.returncode == 7, res.stderr
    assert res.stdout.split() == ["HELLO", f"{p}/share/lora-smoke", str(p), str(p)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_forwards_signals_to_the_command(installed, sig):
    code = ("import signal, sys, time\n"
            "def bye(n, f):\n    print('got', signal.Signals(n).name, flush=True); sys.exit(42)\n"
            "signal.signal(signal.SIGINT, bye); signal.signal(signal.SIGTERM, bye)\n"
            "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "lorastrap", "run", "--prefix", str(installed["prefix"]), "--",
                             "python", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **installed["env"]})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)  # to the pid the caller started: `lorastrap run` itself
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 42, err
    assert out.strip() == f"got {sig.name}"


def test_run_errors_are_clear(installed, tmp_path):
    res = run_cli("run", "--prefix", str(tmp_path / "nowhere"), "--", "python", "-V", env=installed["env"])
    assert res.returncode == 14 and "no environment at" in res.stderr and "lorastrap list" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("run", "--prefix", str(installed["prefix"]), "--", "no-such-tool", env=installed["env"])
    assert res.returncode == 127 and "command not found: no-such-tool" in res.stderr
    res = run_cli("run", "--prefix", str(installed["prefix"]), env=installed["env"])
    assert res.returncode == 2 and "no command to run" in res.stderr


def test_shell_starts_an_activated_shell(installed):
    for shell in ["bash", "posix"] + [s for s in ("zsh", "fish") if shutil.which(s)]:
        res = subprocess.run([sys.executable, "-m", "lorastrap", "shell", "--prefix", str(installed["prefix"]),
                              "--shell", shell], input='echo "in=$CONDA_PREFIX $LORA_SMOKE_DATA"\nexit 3\n',
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, **installed["env"], "HOME": str(installed["prefix"].parent)})
        assert res.returncode == 3, (shell, res.stderr)
        p = installed["prefix"]
        assert f"in={p} {p}/share/lora-smoke" in res.stdout, shell


def test_list_shows_profile_lock_size_health(installed):
    res = run_cli("list", "--json", env=installed["env"])
    assert res.returncode == 0, res.stderr
    (row,) = [r for r in json.loads(res.stdout)["environments"] if r["prefix"] == str(installed["prefix"])]
    assert row["profile"] == "test-cpu" and row["platform"] == "linux-64" and row["health"] == "ok"
    assert row["packages"]["pip"] == 1 and row["packages"]["conda"] >= 30 and row["bytes"] > 0
    assert len(row["lock_content_hash"]) == 64 and row["installed_at"] and row["generations"] == []
    text = run_cli("list", env=installed["env"]).stdout
    assert str(installed["prefix"]) in text and "health: ok" in text and "previous generations: none" in text


# --- update and rollback on a channel that gained a release ---------------------------------------------------

def _update(ch, prefix, *args):
    return run_cli("update", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--pip-index-url", ch["simple"],
                   "--no-verify", *args)


def _peft(prefix):
    res = run_cli("run", "--prefix", str(prefix), "--", "python", "-c", "import peft; print(peft.__version__)")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_update_prints_the_change_rollback_swaps_uninstall_removes(growing_channel, warm_home, tmp_path):
    ch, prefix = growing_channel, tmp_path / "env"
    assert _install(ch, prefix).returncode == 0
    res = _update(ch, prefix, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["changes"] == [], res.stderr  # nothing newer yet
    ch["publish"]("peft", "0.22.0")
    res = _update(ch, prefix, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["changes"] == [{"kind": "upgraded", "manager": "conda", "name": "peft",
                                                  "old": {"version": "0.21.2", "build": "pyh0_0"},
                                                  "new": {"version": "0.22.0", "build": "pyh0_0"}}]
    assert _peft(prefix) == "0.21.2" and not Path(f"{prefix}.lorastrap-backup").exists()
    res = _update(ch, prefix)
    assert res.returncode == 0, res.stderr
    assert "upgraded   peft" in res.stdout and "0.21.2 (pyh0_0) -> 0.22.0 (pyh0_0)" in res.stdout
    assert len([ln for ln in res.stdout.splitlines() if " -> " in ln]) == 1
    assert _peft(prefix) == "0.22.0"
    (row,) = json.loads(run_cli("list", "--json").stdout)["environments"]
    assert len(row["generations"]) == 1 and row["generations"][0]["bytes"] > 0 and row["health"] == "ok"
    res = run_cli("rollback", "--prefix", str(prefix))
    assert res.returncode == 0, res.stderr
    assert "downgraded peft" in res.stdout and _peft(prefix) == "0.21.2"
    assert run_cli("rollback", "--prefix", str(prefix)).returncode == 0 and _peft(prefix) == "0.22.0"
    res = _update(ch, prefix, "--keep-generations", "0")  # nothing newer: no change, generations untouched
    assert res.returncode == 0 and "already up to date" in res.stdout
    # uninstall: the environment, its generation, its lock file and its registry entry; nothing else
    (tmp_path / "mine.txt").write_text("keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    ours = {"env", "env.lorastrap-backup", "env.lorastrap.lock"}  # the lock file is kept (locks.py) until uninstall
    assert ours <= set(before)
    res = run_cli("uninstall", "--prefix", str(prefix), "--json")
    assert res.returncode == 2 and "needs --yes" in res.stderr and prefix.exists()  # no terminal to ask on
    res = run_cli("uninstall", "--prefix", str(prefix), "--json", "--yes")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed_generations"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(before) - ours)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert json.loads(run_cli("list", "--json").stdout)["environments"] == []
    res = run_cli("uninstall", "--prefix", str(prefix), "--yes")
    assert res.returncode == 14 and "no environment at" in res.stderr
    other = tmp_path / "foreign"
    (other / "conda-meta").mkdir(parents=True)
    res = run_cli("uninstall", "--prefix", str(other), "--yes")
    assert res.returncode == 17 and "not installed by lorastrap" in res.stderr and other.exists()


def _stopped(proc, timeout=60):
    """Wait until the process stopped itself (SIGSTOP at a pause point) or exited."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"it exited ({status}) instead of pausing"


def _kill_at(args, stage, *, by_stop=False):
    env = dict(os.environ, LORASTRAP_PAUSE_AT=stage)
    proc = subprocess.Popen([sys.executable, "-m", "lorastrap", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if by_stop:
        _stopped(proc)
    else:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if f"paused at {stage}" in line or not line:
                break
    proc.send_signal(signal.SIGKILL)
    if by_stop:
        os.waitpid(proc.pid, 0)
        proc.returncode = -9
    else:
        proc.wait()
    return proc


def test_update_and_rollback_survive_sigkill(growing_channel, warm_home, tmp_path):
    ch, prefix = growing_channel, tmp_path / "env"
    assert _install(ch, prefix).returncode == 0
    ch["publish"]("peft", "0.22.0")
    update_args = ["update", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--pip-index-url", ch["simple"],
                   "--no-verify"]
    for stage in ("aside", "linked"):  # PREFIX moved aside; the new one linked: the next run rolls back, updates
        _kill_at(update_args, stage)
        assert Path(f"{prefix}.lorastrap-txn.json").exists()
        res = _update(ch, prefix)
        assert res.returncode == 0 and "an earlier run was interrupted" in res.stderr, res.stderr
        assert _peft(prefix) == "0.22.0"
        assert run_cli("rollback", "--prefix", str(prefix)).returncode == 0 and _peft(prefix) == "0.21.2"
    _kill_at(update_args, "commit")  # committing: the next run finishes it, and then there is nothing to do
    res = _update(ch, prefix)
    assert res.returncode == 0 and "finishing it" in res.stderr and "already up to date" in res.stdout, res.stderr
    assert _peft(prefix) == "0.22.0"
    # A rollback killed at each of its steps: the next rollback finishes that one (and does not swap back).
    want = "0.22.0"
    for stage in ("rollback-journal", "rollback-aside", "rollback-swapped"):
        want = "0.21.2" if want == "0.22.0" else "0.22.0"
        _kill_at(["rollback", "--prefix", str(prefix)], stage, by_stop=True)
        assert Path(f"{prefix}.lorastrap-swap.json").exists()
        res = run_cli("rollback", "--prefix", str(prefix), "--json")
        assert res.returncode == 0, res.stderr
        assert _peft(prefix) == want, stage
        assert json.loads(res.stdout)["health"] == "ok"
        assert not Path(f"{prefix}.lorastrap-swap").exists() and not Path(f"{prefix}.lorastrap-swap.json").exists()
        assert len(list(tmp_path.glob("env.lorastrap-backup"))) == 1


def test_the_users_work_survives_update_rollback_update(growing_channel, warm_home, tmp_path):
    """update → edit a notebook → rollback → update: the edit and a new file stay current throughout."""
    ch, prefix = growing_channel, tmp_path / "env"
    assert _install(ch, prefix).returncode == 0
    nb = prefix / "notebooks" / "run.ipynb"
    nb.parent.mkdir()
    nb.write_text("v1")
    ch["publish"]("peft", "0.22.0")
    assert _update(ch, prefix).returncode == 0 and nb.read_text() == "v1"
    nb.write_text("v2: edited after the update")
    (prefix / "notebooks" / "new.txt").write_text("made after the update")
    os.symlink("run.ipynb", prefix / "notebooks" / "latest")
    res = run_cli("rollback", "--prefix", str(prefix))
    assert res.returncode == 0, res.stderr
    assert _peft(prefix) == "0.21.2"
    assert nb.read_text() == "v2: edited after the update"
    assert (prefix / "notebooks" / "new.txt").read_text() == "made after the update"
    assert os.readlink(prefix / "notebooks" / "latest") == "run.ipynb"
    res = _update(ch, prefix, "--keep-generations", "1")  # prunes what was generation 1 before
    assert res.returncode == 0, res.stderr
    assert _peft(prefix) == "0.22.0" and nb.read_text() == "v2: edited after the update"
    assert (prefix / "notebooks" / "new.txt").read_text() == "made after the update"
