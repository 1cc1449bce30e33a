"""Benchmark the Slurm fleet: 1, 3 and 8 nodes (a real slurmctld and one slurmd per network namespace, as the tests
make them; needs root, slurm-wlm and munge) provisioned from one bundle with a shared package cache.

    python scripts/bench_slurm.py [SIZES...]       (default sizes: 1 3 8)

Prints, per fleet size, the wall time of `lorastrap fleet slurm` (submit → every node installed and verified →
fleet.json), of a second run (nothing to change; every node verifies again), and the conda archives each node read
into the shared cache (the package set is read once for the whole job, not once per node).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
import netns_slurm  # noqa: E402
import testchannel  # noqa: E402


def main() -> None:
    sizes = [int(s) for s in sys.argv[1:]] or [1, 3, 8]
    why = netns_slurm.unavailable()
    if why:
        sys.exit(f"bench_slurm: {why}")
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-slurm-") as tmp:
        tmp = Path(tmp)
        bundle = testchannel.offline_bundle(tmp)
        manifest = json.loads((bundle / "manifest.json").read_text())
        conda = sum(m["size"] for rel, m in manifest["files"].items() if rel.startswith("channel/")
                    and rel.endswith(".conda"))
        print(f"bundle: {manifest['packages']} packages, conda archives {conda / 2**20:.2f} MiB")
        print("| nodes | first run | second run (no change) | archives read per node (shared cache) |")
        print("|---|---|---|---|")
        for n in sizes:
            run = tmp / f"fleet{n}"
            with netns_slurm.cluster(n, run / "slurm") as (hub, names, env):
                argv = ["ip", "netns", "exec", hub, sys.executable, "-m", "lorastrap", "fleet", "slurm", "--bundle",
                        str(bundle), "--report-dir", str(run / "reports"), "--pkgs-dir", str(run / "pkgs"),
                        "--prefix", f"{run}/envs/lora-%n"]
                env = dict(env, LORASTRAP_HOME=str(run / "home"))
                walls = []
                for _ in range(2):
                    start = time.perf_counter()
                    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
                    walls.append(time.perf_counter() - start)
                    if res.returncode != 0:
                        sys.exit(res.stdout[-2000:] + res.stderr[-2000:])
                    if len(walls) == 1:
                        reports = [json.loads((run / "reports" / f"{h}.json").read_text()) for h in names]
                per_node = sum(r["downloaded_bytes"] for r in reports) / n
            print(f"| {n} | {walls[0]:.1f} s | {walls[1]:.1f} s | {per_node / 2**20:.2f} MiB "
                  f"({per_node / conda:.2f} of the set) |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
