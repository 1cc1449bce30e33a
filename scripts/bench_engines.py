"""lorastrap side by side with the real micromamba, on the same lock, in one run (alternating, medians).

    python scripts/bench_engines.py [--runs N] [--micromamba PATH] [--sets test,large,big]

Sets: `test` — the test channel (40 conda packages + 1 pip wheel); `large` — the same packages with 106 extra
files of 40 KiB each (>= 4,000 files, >= 150 MB); `big` — the test channel with four archives of 320 MiB
(incompressible: 1.3 GB, the shape of a CUDA environment). Each set is served on loopback twice by
scripts/netsim.py (keep-alive, Range): plain, and `shaped` (+20 ms a request, a bandwidth cap per connection:
5 MiB/s, 40 MiB/s for `big`).

For each set and scenario, four commands run in turn, N times (wall time of the whole process, interpreter
start and detection included): `lorastrap install --no-verify` with the embedded engine, the same with
`--engine micromamba`, `micromamba create -f LOCK` on the same lock, and py-rattler alone (`rattler.install` of the
lock's conda records, the engine lorastrap embeds, in a Python process of its own). micromamba and py-rattler get
the lock's conda entries: the test channel's `pip` is a stand-in, so their pip step cannot run there; lorastrap's
figures include its pip step. Scenarios: cold (empty caches, over HTTP), warm (caches filled, a fresh prefix),
no-op (lorastrap re-run on an environment that matches); and `detect` against the bare interpreter.
Every timed run starts after `sync` (the same for every tool); a warm run follows its tool's own cold run: without
it the timed run also pays the writeback of what the runs before wrote — a warm one through the engine's fsyncs
(py-rattler fsyncs each conda-meta record; micromamba 1.5 does none) — `--no-sync` measures that way too. A run's
thousands of files (the environment a warm run's caches were filled by too) are removed only once every set is
measured, not before the next run (see Bench.discard).
Targets: warm <= 1.25x micromamba, cold <= 0.8x, no-op <= 0.15 s, detect <= 60 ms over the interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from netsim import NetSim  # noqa: E402

TEST_ENVS = ROOT / "tests" / "envs"
LOCK_NAME = "test-cpu.linux-64.conda-lock.yml"
SETS = {"test": {}, "large": {"LORASTRAP_TESTCHANNEL_FILES": "106", "LORASTRAP_TESTCHANNEL_FILE_KIB": "40"},
        "big": {"LORASTRAP_TESTCHANNEL_BIG": "pytorch=320,python=320,numpy=320,bitsandbytes=320"}}
SHAPED_RATE = {"test": 5 * 2**20, "large": 5 * 2**20, "big": 40 * 2**20}
MANY_FILES = 1000  # a run's tree of this many files is removed only once every set is measured (Bench.discard)
TARGETS = {"warm": 1.25, "cold": 0.8, "cold-shaped": 0.8}
WHO = ("rattler", "micromamba-engine", "micromamba", "py-rattler")
RATTLER_ALONE = """
import asyncio, os, sys
import rattler
lock = rattler.LockFile.from_path(sys.argv[1])
env = lock.default_environment()
plat = next(p for p in env.platforms() if str(p) == "linux-64")
records = env.conda_repodata_records_for_platform(plat)
asyncio.run(rattler.install(records, target_prefix=sys.argv[2], cache_dir=sys.argv[3]))
sys.stdout.flush()
os._exit(0)  # py-rattler may crash at interpreter shutdown after the work is done
"""


def timed(argv, env) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, argv))}\n{res.stderr[-3000:]}")
    return wall, res


class Bench:
    def __init__(self, tmp: Path, mm: Path, url: str, lock: dict, sync: bool = True):
        self.tmp, self.mm, self.url, self.lock, self.sync = tmp, mm, url, lock, sync
        self.set_aside = 0  # trees moved into the set's trash (discard)
        self.n = 0

    def _home(self) -> Path:
        self.n += 1
        home = self.tmp / f"home{self.n}"
        (home / "locks").mkdir(parents=True)
        (home / "locks" / LOCK_NAME).write_text(yaml.safe_dump(self.lock, sort_keys=False))
        return home

    def lorastrap(self, engine: str, home: Path, prefix: Path) -> tuple[float, dict]:
        env = dict(os.environ, LORASTRAP_HOME=str(home), MAMBA_EXE=str(self.mm))
        env.pop("LORASTRAP_PKGS_DIR", None)
        wall, res = timed([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(TEST_ENVS), "--channel",
                           f"{self.url}/channel", "--pip-index-url", f"{self.url}/simple", "--prefix", str(prefix),
                           "--engine", engine, "--no-verify", "--json"], env)
        return wall, json.loads(res.stdout)

    def micromamba(self, root: Path, prefix: Path) -> float:
        lock = dict(self.lock, package=[p for p in self.lock["package"] if p["manager"] == "conda"])
        lock_file = self.tmp / "bench-lock.yml"
        if not lock_file.exists():
            lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        (root / "pkgs").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDA_", "MAMBA_"))}
        env.update(MAMBA_ROOT_PREFIX=str(root), CONDA_PKGS_DIRS=str(root / "pkgs"), HOME=str(root))
        wall, _ = timed([str(self.mm), "create", "-y", "-q", "--no-rc", "--root-prefix", str(root), "-p", str(prefix),
                         "-f", str(lock_file)], env)
        return wall

    def rattler_alone(self, cache: Path, prefix: Path) -> float:
        lock_file = self.tmp / "bench-conda-lock.yml"
        if not lock_file.exists():
            lock = dict(self.lock, package=[p for p in self.lock["package"] if p["manager"] == "conda"])
            lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        wall, _ = timed([sys.executable, "-c", RATTLER_ALONE, str(lock_file), str(prefix), str(cache)], dict(os.environ))
        return wall

    def settle(self) -> None:
        """What the runs before wrote reaches the disk before the timed run (see the module's docstring)."""
        if self.sync:
            os.sync()

    def scenario(self, kind: str, runs: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {w: [] for w in WHO}
        out.update(pip=[], noop=[], files=[])
        for _ in range(runs):
            for who in WHO:
                home, prefix = self._home(), self.tmp / f"env{self.n}"
                if who == "py-rattler":
                    if kind == "warm":
                        self.rattler_alone(home / "rc", prefix)
                        self.discard(prefix)  # not removed: see discard
                    self.settle()
                    out[who].append(self.rattler_alone(home / "rc", prefix))
                elif who == "micromamba":
                    if kind == "warm":
                        self.micromamba(home / "mm", prefix)
                        self.discard(prefix)  # not removed: see discard
                    self.settle()
                    out[who].append(self.micromamba(home / "mm", prefix))
                else:
                    engine = "rattler" if who == "rattler" else "micromamba"
                    if kind == "warm":
                        self.lorastrap(engine, home, prefix)
                        self.discard(prefix)  # not removed: see discard
                    self.settle()
                    wall, result = self.lorastrap(engine, home, prefix)
                    out[who].append(wall)
                    out["files"].append(sum(len(f) for _, _, f in os.walk(prefix)))
                    if kind == "warm":
                        out["pip"].append(result["timings"].get("pip", 0.0))
                        wall, result = self.lorastrap(engine, home, prefix)
                        assert not result["changed"]
                        out["noop"].append(wall)
                self.discard(home, prefix)
        return out

    def discard(self, *trees: Path) -> None:
        """A run's trees: removed, or, when they hold thousands of files, moved aside into the set's trash, which
        goes with the benchmark's temporary folder once every set is measured.  Removed here, each run would follow
        the removal of the one before's thousands of files, which ext4 without a journal (these machines) makes
        every new file scan for a while (`recently_deleted`: a minute, six while the inode table is not written
        back): the next run paid for the last one's files, by a cost that moved ~1 s with nothing else changed.  So
        is the environment a warm run's caches were filled by (its 4,041 files were removed right before the timed
        run), and so are a set's trees kept until the last set is measured, for the same reason.  A few big files
        are removed at once: kept, their gigabytes would be written back to the disk during the next runs (each
        timed run starts after `sync`, see settle)."""
        trash = self.tmp.parent / "trash"
        trash.mkdir(exist_ok=True)
        for tree in trees:
            if sum(len(files) for _, _, files in os.walk(tree)) < MANY_FILES:
                shutil.rmtree(tree, ignore_errors=True)
            elif tree.exists():
                self.set_aside += 1
                tree.rename(trash / f"{self.tmp.name}-{self.set_aside}-{tree.name}")


def measure(name: str, extra_env: dict, runs: int, mm: Path, tmp: Path, sync: bool = True) -> list[tuple]:
    tc = tmp / name / "tc"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(tc)], check=True,
                   capture_output=True, env=dict(os.environ, **extra_env))
    plain = NetSim(tc).start()
    shaped = NetSim(tc, delay_s=0.020, rate=SHAPED_RATE[name]).start()
    try:
        home = tmp / name / "lockhome"
        timed([sys.executable, "-m", "lorastrap", "lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu",
               "--platform", "linux-64", "--channel", f"{plain.url}/channel", "--pip-index-url",
               f"{plain.url}/simple", "-o", str(home / LOCK_NAME)], dict(os.environ, LORASTRAP_HOME=str(home)))
        lock = yaml.safe_load((home / LOCK_NAME).read_text())
        shaped_lock = yaml.safe_load((home / LOCK_NAME).read_text().replace(plain.url, shaped.url))
        conda = [p for p in lock["package"] if p["manager"] == "conda"]
        size = sum((tc / "channel" / p["url"].rsplit("/", 2)[-2] / p["url"].rsplit("/", 1)[-1]).stat().st_size
                   for p in conda)
        rows = []
        for kind, url, lk in ((("warm", plain.url, lock),) if name != "big" else ()) + (
                ("cold", plain.url, lock), ("cold-shaped", shaped.url, shaped_lock)):
            b = Bench(tmp / name / kind, mm, url, lk, sync=sync)
            b.tmp.mkdir(parents=True)
            r = b.scenario(kind.split("-")[0], runs)
            rows.append((name, kind, len(conda), len(lock["package"]) - len(conda), size, r))
            shutil.rmtree(b.tmp, ignore_errors=True)
        return rows
    finally:
        plain.shutdown()
        shaped.shutdown()  # the set's trash stays until every set is measured (Bench.discard)


def bench_detect(runs: int) -> dict[str, float]:
    """`lorastrap detect --json` and `--version` against the bare interpreter, alternating, medians."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmds = {"bare": [sys.executable, "-c", "pass"], "version": [sys.executable, "-m", "lorastrap", "--version"],
            "detect": [sys.executable, "-m", "lorastrap", "detect", "--json"]}
    got: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):
        for k, argv in cmds.items():
            got[k].append(timed(argv, env)[0])
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--micromamba", type=Path,
                    default=Path(os.environ.get("MAMBA_EXE") or ROOT.parent / "shared/tools/micromamba/bin/micromamba"))
    ap.add_argument("--sets", default="test,large,big")
    ap.add_argument("--no-sync", action="store_true",
                    help="time each run unsettled (a warm one right after the cold one)")
    args = ap.parse_args()
    if not args.micromamba.is_file():
        sys.exit(f"no micromamba at {args.micromamba}: pass --micromamba PATH or set MAMBA_EXE")
    med = statistics.median
    rows = []
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "installer")], capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})  # as installed
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-engines-") as tmp:
        for name in args.sets.split(","):
            rows += measure(name, SETS[name], args.runs, args.micromamba, Path(tmp), sync=not args.no_sync)
    detect = bench_detect(args.runs * 3)
    print(f"medians of {args.runs} runs, wall time of the whole process; micromamba {args.micromamba}; each run "
          f"{'unsettled, a warm one right after the cold one (--no-sync)' if args.no_sync else 'after sync'}")
    print("| set | scenario | packages | archives | files | lorastrap (embedded) | lorastrap (--engine micromamba) | "
          "micromamba create -f | py-rattler alone | best lorastrap / micromamba | target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kind, n, npip, size, r in rows:
        best = min(med(r["rattler"]), med(r["micromamba-engine"]))
        ratio = best / med(r["micromamba"])
        ok = ratio <= TARGETS[kind]
        print(f"| {name} | {kind} | {n} conda + {npip} pip | {size / 2**20:,.0f} MiB | {max(r['files']):,} | "
              f"{med(r['rattler']):.2f} s | {med(r['micromamba-engine']):.2f} s | {med(r['micromamba']):.2f} s | "
              f"{med(r['py-rattler']):.2f} s | {ratio:.2f}x | <= {TARGETS[kind]}x {'met' if ok else 'NOT met'} |")
    for name, kind, n, npip, size, r in rows:
        if kind == "warm":
            noop, pip = med(r["noop"]), med(r["pip"])
            print(f"{name}: no-op re-run {noop:.3f} s (target <= 0.15 s: {'met' if noop <= 0.15 else 'NOT met'}); "
                  f"pip step {pip:.3f} s")
    over = detect["detect"] - detect["bare"]
    print(f"detect {detect['detect'] * 1000:.0f} ms, bare interpreter {detect['bare'] * 1000:.0f} ms: "
          f"{over * 1000:.0f} ms over (target <= 60 ms: {'met' if over <= 0.060 else 'NOT met'}); "
          f"`--version` {detect['version'] * 1000:.0f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
