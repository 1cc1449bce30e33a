"""Benchmark the install of the test channel's lock (embedded engine; micromamba too when on PATH).

    python scripts/bench_install.py [RUNS] [FILES_PER_PACKAGE]

FILES_PER_PACKAGE (default 0) adds that many 2 KiB files to every package of the test channel, to see the
engine against the floor at a realistic file count (a conda-forge CUDA LoRA environment has tens of thousands).

Prints cold-cache and warm-cache install time, lorastrap's own overhead (total minus the engine's call), the
no-op re-run time, and the physical floor: `cp -al` of the same extracted package set.  Medians over RUNS (5).
Targets (issue 3): warm <= 2x the cp -al floor; overhead <= 0.5 s; no-op <= 1 s.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import testchannel  # noqa: E402


def run(args, home, extra_env=None):
    env = dict(os.environ, LORASTRAP_HOME=str(home), **(extra_env or {}))
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lorastrap", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{res.stderr}")
    return wall, json.loads(res.stdout) if "--json" in args else None


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    extra_files = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    engines = ["rattler"] + (["micromamba"] if shutil.which("micromamba") else [])
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(tmp / "tc")],
                       check=True, capture_output=True,
                       env=dict(os.environ, LORASTRAP_TESTCHANNEL_FILES=str(extra_files)))
        server, url = testchannel.serve(tmp / "tc")
        base = ["install", "--envs-dir", str(ROOT / "tests" / "envs"), "--channel", f"{url}/channel",
                "--pip-index-url", f"{url}/simple", "--json", "--no-verify"]
        rows = []
        for engine in engines:
            cold, warm, overhead, noop, eng, pip = [], [], [], [], [], []
            for i in range(runs):
                home = tmp / f"home-{engine}-{i}"
                prefix = tmp / f"env-{engine}-{i}"
                args = base + ["--engine", engine, "--prefix", str(prefix)]
                run(["lock", "--envs-dir", str(ROOT / "tests" / "envs"), "--profile", "test-cpu", "--platform",
                     "linux-64", "--channel", f"{url}/channel", "--pip-index-url", f"{url}/simple",
                     "-o", str(home / "locks" / "test-cpu.linux-64.conda-lock.yml")], home)
                wall, out = run(args, home)  # cold: empty package cache
                cold.append(wall)
                shutil.rmtree(prefix)
                wall, out = run(args, home)  # warm: archives and extracted packages cached
                warm.append(wall)
                t = out["timings"]
                overhead.append(wall - t["engine"] - t.get("pip", 0.0) - t.get("check", 0.0))
                eng.append(t["engine"])
                pip.append(t.get("pip", 0.0))
                nfiles = sum(1 for p in prefix.rglob("*") if p.is_file())
                wall, out = run(args, home)  # no-op
                assert not out["changed"]
                noop.append(wall)
            extracted = [p for p in (home / "pkgs" / "extracted").iterdir() if p.is_dir()]
            floor = []
            for i in range(runs):
                dest = tmp / f"floor-{engine}-{i}"
                dest.mkdir()
                start = time.perf_counter()
                subprocess.run(["cp", "-al", *map(str, extracted), str(dest)], check=True)
                floor.append(time.perf_counter() - start)
            rows.append((engine, statistics.median(cold), statistics.median(warm), statistics.median(overhead),
                         statistics.median(noop), statistics.median(floor), len(extracted),
                         statistics.median(eng), statistics.median(pip), nfiles))
        server.shutdown()
    print(f"test channel lock (test-cpu, linux-64, +{extra_files} files per package), medians of {runs} runs, "
          "wall time incl. interpreter start")
    print("| engine | packages | files | cold install | warm install | engine call (warm) | pip step | overhead | no-op "
          "| cp -al floor | warm / floor | engine / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for engine, cold, warm, ovh, noop, floor, n, e, p, nf in rows:
        print(f"| {engine} | {n} | {nf} | {cold:.2f} s | {warm:.2f} s | {e:.3f} s | {p:.2f} s | {ovh:.2f} s | "
              f"{noop:.2f} s | {floor * 1000:.0f} ms | {warm / floor:.1f}x | {e / floor:.1f}x |")
    print("overhead = warm wall time - engine call - pip step - conda-meta/smoke check (interpreter start, detect,")
    print("plan, lock read, cache check, journal, record); engine call includes starting the py-rattler worker process.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
