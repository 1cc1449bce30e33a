"""Randomized kill soak: installs, profile switches and repairs of one environment holding a user file, each
interrupted by SIGINT, SIGTERM or SIGKILL at a random moment of the whole run, then run again.

    python scripts/soak_kill.py [RUNS] [--seed N]     # builds the test channel, serves it on 127.0.0.1, soaks

After every interrupted run the invariant is checked: PREFIX works (its packaged entry point runs) with the user's
file in it, or the journal is there and says how the next run restores it (the backup is complete and holds the
user's file, or the journal says "committing" and PREFIX is the complete new environment).  After the re-run:
exit 0, PREFIX works, the user's file is intact, and nothing is left over (journal, backup, trash, lock files,
partial downloads, processes working in the environment).  tests/test_kill.py runs 30 of these on every test run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_ENVS = ROOT / "tests" / "envs"
USER_FILE = Path("mydata") / "notes.txt"
USER_TEXT = "the user's own work\n"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
OPS = ("install-cpu", "install-cuda", "install-cuda", "repair", "repair")  # cpu has a pip entry: slow (~4 s)


@dataclass
class Stats:
    runs: int = 0
    interrupted: dict[str, int] = field(default_factory=dict)  # signal name → runs it stopped before they ended
    finished_first: int = 0  # the run ended before the signal came
    survived: int = 0
    envs_lost: int = 0
    user_files_lost: int = 0
    leftovers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _argv(op: str, prefix: Path, channel_url: str, simple: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_OVERRIDE_CUDA", "LORASTRAP_PAUSE_AT")}
    base = [sys.executable, "-m", "lorastrap"]
    src = ["--envs-dir", str(TEST_ENVS), "--channel", channel_url, "--pip-index-url", simple, "--prefix", str(prefix)]
    if op == "repair":
        return base + ["repair", "--yes", "--drop-backup"] + src, env
    if op == "install-cuda":
        env["CONDA_OVERRIDE_CUDA"] = "12.4"
    return base + ["install"] + src, env


def works(prefix: Path) -> bool:
    """The environment runs its packaged entry point (a #! line written for PREFIX) and holds the user's file."""
    exe = prefix / "bin" / "lora-smoke"
    if not exe.exists():
        return False
    try:
        res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return res.returncode == 0 and json.loads(res.stdout).get("prefix") == str(prefix)


def has_user_file(where: Path) -> bool:
    try:
        return (where / USER_FILE).read_text() == USER_TEXT
    except OSError:
        return False


def _complete(where: Path) -> bool:
    """A complete environment, wherever it sits now (the backup's #! lines name PREFIX, so only its files)."""
    return (where / "bin" / "lora-smoke").exists() and len(list((where / "conda-meta").glob("*.json"))) >= 30


def check_invariant(prefix: Path) -> str | None:
    """Right after an interrupted run: None when the user's environment is usable or restorable, else what broke."""
    journal = prefix.with_name(prefix.name + ".lorastrap-txn.json")
    backup = prefix.with_name(prefix.name + ".lorastrap-backup")
    if not journal.exists():
        if not works(prefix):
            return "no journal and PREFIX does not work"
        return None if has_user_file(prefix) else "no journal and the user's file is not in PREFIX"
    try:
        state = json.loads(journal.read_text()).get("state")
    except (OSError, ValueError):
        state = "aside"  # a journal cut while written reads as the earliest state (txn.read_journal)
    if state == "committing":
        if not works(prefix):
            return "committing, but PREFIX does not work"
        return None if has_user_file(prefix) else "committing, but the user's file is not in PREFIX"
    if backup.exists():
        if not _complete(backup):
            return f"journal {state}: the backup is incomplete"
        return None if has_user_file(backup) else f"journal {state}: the user's file is not in the backup"
    if works(prefix) and has_user_file(prefix):
        return None  # stopped before the previous environment moved
    return f"journal {state}, no backup, and PREFIX does not work"


def leftovers(prefix: Path, home: Path) -> list[str]:
    """What must not be there once a run ended well."""
    found = [p.name for p in prefix.parent.iterdir()
             if p.name.startswith(prefix.name + ".") and p.name != prefix.name + ".lorastrap.lock"]  # kept: locks.py
    found += [str(p) for p in (home / "pkgs").rglob("*.part")]
    found += [str(p) for p in (home / "pkgs").glob(".lorastrap-install-*")]
    for proc in Path("/proc").iterdir():  # anything still working in or on the environment
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(prefix)) or str(prefix) + "/" in cmd:
            found.append(f"process {proc.name}: {cmd[:120]}")
    return found


SPARE = ("tzdata", "ca-certificates", "xz", "bzip2", "ncurses", "readline", "libsqlite", "libffi")


def _damage(prefix: Path, rng: random.Random) -> None:
    """Delete one file of a package the entry point does not need: what repair is for."""
    records = sorted(r for r in (prefix / "conda-meta").glob("*.json") if r.name.rsplit("-", 2)[0] in SPARE)
    for rec in rng.sample(records, len(records)):
        paths = [p["_path"] for p in json.loads(rec.read_text()).get("paths_data", {}).get("paths", [])]
        paths = [p for p in paths if (prefix / p).is_file() and not p.startswith("bin/")
                 and "site-packages" not in p]
        if paths:
            (prefix / rng.choice(paths)).unlink()
            return


def _run(argv, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def soak(*, prefix: Path, home: Path, channel_url: str, simple: str, runs: int, seed: int,
         say=lambda m: None) -> Stats:
    """Install PREFIX with the user's file, then RUNS interrupted operations, each followed by its re-run."""
    rng = random.Random(seed)
    stats = Stats()
    argv, env = _argv("install-cpu", prefix, channel_url, simple)
    res = _run(argv, env)
    if res.returncode != 0:
        raise RuntimeError(f"the first install failed: {res.stderr[-2000:]}")
    (prefix / USER_FILE).parent.mkdir(parents=True, exist_ok=True)
    (prefix / USER_FILE).write_text(USER_TEXT)
    durations: dict[str, float] = {}
    for i in range(runs):
        op = rng.choice(OPS)
        sig = rng.choice(SIGNALS)
        if op == "repair":
            _damage(prefix, rng)
        argv, env = _argv(op, prefix, channel_url, simple)
        span = durations.get(op, 3.0)
        delay = rng.uniform(0, span)
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            stats.failures.append(f"run {i} ({op}, {sig.name} at {delay:.2f} s): did not stop within 120 s")
        stats.runs += 1
        if proc.returncode == 0 and time.monotonic() - start <= delay + 0.05:
            stats.finished_first += 1
        else:
            stats.interrupted[sig.name] = stats.interrupted.get(sig.name, 0) + 1
            if sig != signal.SIGKILL and "Traceback" in err and "lorastrap/" in err:  # (not the interpreter's start)
                stats.failures.append(f"run {i} ({op}, {sig.name} at {delay:.2f} s): traceback: {err[-800:]}")
        broken = check_invariant(prefix)
        if broken:
            stats.failures.append(f"run {i} ({op}, {sig.name} at {delay:.2f} s): {broken}")
        # The re-run: recovers first, then does what was asked.
        t = time.monotonic()
        res = _run(argv, env)
        durations[op] = time.monotonic() - t  # the latest uninterrupted run of it: where the next signal may land
        ok = res.returncode == 0 and works(prefix)
        if not ok:
            stats.envs_lost += 1
            stats.failures.append(f"run {i} ({op}) re-run: exit {res.returncode}: {res.stderr[-800:]}")
        if not has_user_file(prefix):
            stats.user_files_lost += 1
            stats.failures.append(f"run {i} ({op}): the user's file is gone after the re-run")
        left = leftovers(prefix, home)
        stats.leftovers += [f"run {i} ({op}): {x}" for x in left]
        if ok and not broken and not left:
            stats.survived += 1
        say(f"run {i}: {op} + {sig.name} at {delay:.2f} s -> exit {proc.returncode}; "
            f"{'ok' if ok and not broken and not left else 'FAILED'}")
    return stats


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    import testchannel
    runs = int(argv[0]) if argv and argv[0].isdigit() else 200
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else int(time.time())
    with tempfile.TemporaryDirectory(prefix="lorastrap-soak-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(tmp / "tc")],
                       check=True, capture_output=True)
        server, url = testchannel.serve(tmp / "tc")
        os.environ["LORASTRAP_HOME"] = str(tmp / "home")
        try:
            stats = soak(prefix=tmp / "env", home=tmp / "home", channel_url=f"{url}/channel",
                         simple=f"{url}/simple", runs=runs, seed=seed, say=lambda m: print(m, file=sys.stderr))
        finally:
            server.shutdown()
    print(json.dumps({"seed": seed, **stats.__dict__}, indent=2))
    return 0 if not stats.failures and not stats.leftovers else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
