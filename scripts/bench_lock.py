"""`lorastrap lock` side by side with micromamba's solve (`create --dry-run`), on the same spec and channel, in one
run (alternating, medians; wall and CPU time of the whole process).

    python scripts/bench_lock.py [--runs N] [--micromamba PATH] [--fill N]

The channel is the transcribed conda-forge one (scripts/condaforge_channel.py) read over file://, and the profile
is `cuda12` (linux-64, conda side only: micromamba's dry run has no pip step).  Its real closure is ~37 packages;
`--fill N` (default 270) adds N noarch packages to the channel's repodata, required by one more spec line, so that
the closure reaches the few hundred packages of a real CUDA environment (the issue's measure: a 332-package
closure).  They exist only in repodata: a lock and a dry-run solve never download.  Target: lock <= 0.4 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "cuda12"


def timed(argv: list, env: dict) -> tuple[float, float]:
    """Wall and CPU (user + sys of the child and its children) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, argv))}\n{res.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fill(channel: Path, n: int) -> None:
    """N noarch packages in the channel's repodata, all required by `lorastrap-bench-fill`."""
    path = channel / "noarch" / "repodata.json"
    doc = json.loads(path.read_text())
    names = [f"bench-fill-{i:03d}" for i in range(n)]
    for i, name in enumerate(names + ["lorastrap-bench-fill"]):
        depends = names if name == "lorastrap-bench-fill" else ["python >=3.9"] + names[i + 1:i + 3]
        doc["packages.conda"][f"{name}-1.0-pyh0_0.conda"] = {
            "build": "pyh0_0", "build_number": 0, "depends": depends, "md5": f"{i:032x}", "name": name,
            "noarch": "python", "sha256": f"{i:064x}", "size": 1000, "subdir": "noarch", "timestamp": 1767225600000,
            "version": "1.0"}
    path.write_text(json.dumps(doc))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--fill", type=int, default=270)
    ap.add_argument("--micromamba", type=Path, default=ROOT.parent / "shared" / "tools" / "micromamba" / "bin" / "micromamba")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorastrap-bench-lock-"))
    try:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "condaforge_channel.py"), "build", str(tmp / "cf")],
                       check=True, capture_output=True)
        channel = tmp / "cf" / "channel"
        if a.fill:
            fill(channel, a.fill)
        envs = tmp / "envs"
        shutil.copytree(ROOT / "envs", envs, ignore=shutil.ignore_patterns("*.conda-lock.yml"))
        spec = envs / f"{PROFILE}.yml"
        if a.fill:
            spec.write_text(spec.read_text().replace("dependencies:\n", "dependencies:\n  - lorastrap-bench-fill\n", 1))
        specs = [d for d in yaml.safe_load(spec.read_text())["dependencies"] if isinstance(d, str)]
        vps = {"CONDA_OVERRIDE_CUDA": "12.0", "CONDA_OVERRIDE_GLIBC": "2.28"}
        env = {**os.environ, "HOME": str(tmp / "home"), "LORASTRAP_HOME": str(tmp / "lhome")}
        out = tmp / "out.conda-lock.yml"
        lorastrap = [sys.executable, "-m", "lorastrap", "lock", "--envs-dir", envs, "--profile", PROFILE,
                     "--channel", channel.as_uri(), "-o", out]
        mm = [a.micromamba, "create", "--dry-run", "-y", "-p", tmp / "mmenv", "-r", tmp / "mmroot",
              "--override-channels", "-c", channel.as_uri(), "--platform", "linux-64", *specs]
        mm_env = {**env, **vps}
        timed(lorastrap, env)  # first runs fill the repodata caches; not counted
        timed(mm, mm_env)
        rows = {"lorastrap lock": [], "micromamba create --dry-run": []}
        for _ in range(a.runs):
            rows["lorastrap lock"].append(timed(lorastrap, env))
            rows["micromamba create --dry-run"].append(timed(mm, mm_env))
        n = sum(1 for line in out.read_text().splitlines() if line.startswith("- name:"))
        print(f"closure: {n} packages (linux-64), {a.runs} runs each, alternating")
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
        base = med["micromamba create --dry-run"]
        for k, (wall, cpu) in med.items():
            print(f"{k:30s} wall {wall:6.3f} s ({wall / base[0]:5.1f}x)  cpu {cpu:6.3f} s ({cpu / base[1]:5.1f}x)  "
                  f"min wall {min(w for w, _ in rows[k]):.3f} s")
        print(f"target: lorastrap lock <= 0.4 s: {'met' if med['lorastrap lock'][0] <= 0.4 else 'missed'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
