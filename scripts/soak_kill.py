"""Randomized kill soak: installs, profile switches and repairs of one environment holding a user file, each
interrupted by SIGINT, SIGTERM or SIGKILL at a random moment of the whole run, then run again.

    python scripts/soak_kill.py [RUNS] [--seed N]     # builds the test channel, serves it on 127.0.0.1, soaks

After every interrupted run the invariant is checked: PREFIX works (its packaged entry point runs) with the user's
file in it, or the journal is there and says how the next run restores it (the backup is complete and holds the
user's file, or the journal says "committing" and PREFIX is the complete new environment).  After the re-run:
exit 0, PREFIX works, the user's file is intact, and nothing is left over (journal, backup, trash, lock files,
partial downloads, processes working in the environment).  tests/test_kill.py runs a short weighted soak in the
default tier (signals inside the transaction's pause points, a cold cache now and then, rollbacks) and 30 runs in
the slow tier.
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
OPS = ("install-cpu", "install-cuda", "install-cuda", "repair", "repair", "rollback")  # cpu has a pip entry (~4 s)
# The transaction's pause points (LORASTRAP_PAUSE_AT): the critical windows. A weighted run stops there for PAUSE_S,
# and the signal lands inside that window (at a random moment of it) instead of anywhere in the run.
PAUSE_POINTS = ("download", "aside", "linked", "verify", "commit")
PAUSE_S = 0.4


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
    at_pause_points: dict[str, int] = field(default_factory=dict)  # pause point → runs signalled inside it
    cold_cache_runs: int = 0  # runs started with archives (and their extracted copies) dropped from the cache
    unrelated_killed: int = 0  # processes lorastrap did not start that died during a run


def _argv(op: str, prefix: Path, channel_url: str, simple: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_OVERRIDE_CUDA", "LORASTRAP_PAUSE_AT")}
    base = [sys.executable, "-m", "lorastrap"]
    src = ["--envs-dir", str(TEST_ENVS), "--channel", channel_url, "--pip-index-url", simple, "--prefix", str(prefix)]
    if op == "repair":
        return base + ["repair", "--yes", "--drop-backup"] + src, env
    if op == "rollback":
        return base + ["rollback", "--prefix", str(prefix)], env
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
    swap = prefix.with_name(prefix.name + ".lorastrap-swap.json")
    if swap.exists():  # a rollback cut between its renames: both environments are complete somewhere
        parked = prefix.with_name(prefix.name + ".lorastrap-swap")
        places = [p for p in (prefix, backup, parked) if p.exists()]
        if len(places) < 2 or not all(_complete(p) for p in places):
            return f"rollback journal, but only {[p.name for p in places]} (complete: {[_complete(p) for p in places]})"
        return None if any(has_user_file(p) for p in places) else "rollback journal, and the user's file is nowhere"
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
    kept = {prefix.name + ".lorastrap.lock"}  # the lock file stays (locks.py)
    backup = prefix.with_name(prefix.name + ".lorastrap-backup")
    if backup.exists() and _complete(backup) and (backup / "conda-meta" / "lorastrap" / "record.json").exists():
        kept.add(backup.name)  # the generation rollback swaps with (kept on purpose)
    found = [p.name for p in prefix.parent.iterdir() if p.name.startswith(prefix.name + ".") and p.name not in kept]
    found += [str(p) for p in (home / "pkgs").rglob("*.part")]
    found += [str(p) for p in (home / "pkgs").rglob("*.part.segments")]  # a segmented download's sidecar
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


def _cool(home: Path, rng: random.Random) -> None:
    """A cold cache for the next run: a few archives and their extracted copies dropped (download windows, .part
    files left by a signal mid-download)."""
    archives = sorted((home / "pkgs" / "archives").glob("*/*.conda"))
    for a in rng.sample(archives, min(3, len(archives))):
        for p in a.parent.iterdir():
            p.unlink()
        for x in (home / "pkgs" / "extracted").glob(a.name[: -len(".conda")]):
            subprocess.run(["rm", "-rf", str(x)], check=False)


def _ensure_generation(prefix: Path, channel_url: str, simple: str) -> None:
    """rollback needs a previous generation: made (uninterrupted) by installing the other profile, keeping the
    replaced one."""
    if prefix.with_name(prefix.name + ".lorastrap-backup").exists():
        return
    cuda = "12.4" if "torch_build\": \"cpu" in _smoke_out(prefix) else ""
    env = {k: v for k, v in os.environ.items() if k != "LORASTRAP_PAUSE_AT"}
    env["CONDA_OVERRIDE_CUDA"] = cuda
    res = _run([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS), "--channel", channel_url,
                "--pip-index-url", simple, "--prefix", str(prefix), "--keep-backup"], env)
    if res.returncode != 0:
        raise RuntimeError(f"making a generation failed: {res.stderr[-2000:]}")


def _smoke_out(prefix: Path) -> str:
    try:
        return subprocess.run([str(prefix / "bin" / "lora-smoke")], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return ""


def _bystander() -> subprocess.Popen:
    """A process lorastrap did not start, in its own session (as another user's job): it must outlive every run."""
    return subprocess.Popen(["setsid", "sleep", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def soak(*, prefix: Path, home: Path, channel_url: str, simple: str, runs: int, seed: int,
         weighted: float = 0.0, cold: float = 0.0, say=lambda m: None) -> Stats:
    """Install PREFIX with the user's file, then RUNS interrupted operations, each followed by its re-run.
    WEIGHTED: the share of runs signalled inside a pause point (a critical window); COLD: the share of runs started
    with part of the cache dropped."""
    rng = random.Random(seed)
    stats = Stats()
    argv, env = _argv("install-cpu", prefix, channel_url, simple)
    res = _run(argv, env)
    if res.returncode != 0:
        raise RuntimeError(f"the first install failed: {res.stderr[-2000:]}")
    (prefix / USER_FILE).parent.mkdir(parents=True, exist_ok=True)
    (prefix / USER_FILE).write_text(USER_TEXT)
    durations: dict[str, float] = {}
    bystander = _bystander()
    for i in range(runs):
        op = rng.choice(OPS)
        sig = rng.choice(SIGNALS)
        if op == "repair":
            _damage(prefix, rng)
        if op == "rollback":
            _ensure_generation(prefix, channel_url, simple)
        if cold and op != "rollback" and rng.random() < cold:
            _cool(home, rng)
            stats.cold_cache_runs += 1
        argv, env = _argv(op, prefix, channel_url, simple)
        point = rng.choice(PAUSE_POINTS) if op != "rollback" and rng.random() < weighted else None
        if point:
            env = {**env, "LORASTRAP_PAUSE_AT": point, "LORASTRAP_PAUSE_S": str(PAUSE_S)}
        span = durations.get(op, 3.0)
        delay = rng.uniform(0, span if not point else PAUSE_S)
        start = time.monotonic()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        early = ""
        if point:  # wait for the window, then signal inside it
            for line in proc.stderr:
                early += line
                if f"paused at {point}" in line:
                    time.sleep(delay)
                    proc.send_signal(sig)
                    stats.at_pause_points[point] = stats.at_pause_points.get(point, 0) + 1
                    break
            delay = time.monotonic() - start
        else:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
            err = early + err
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
        say(f"run {i}: {op} + {sig.name} at {delay:.2f} s" + (f" (inside {point})" if point else "")
            + f" -> exit {proc.returncode}; {'ok' if ok and not broken and not left else 'FAILED'}")
        if bystander.poll() is not None:
            stats.unrelated_killed += 1
            stats.failures.append(f"run {i} ({op}): a process lorastrap did not start died")
            bystander = _bystander()
    bystander.kill()
    bystander.wait()
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
