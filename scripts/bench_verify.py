"""Benchmark scripts/verify_lora.py: total time and per-check times, imports apart, medians over N runs.

    python scripts/bench_verify.py PREFIX [N]     # PREFIX: an environment (conda env or venv) with the stack
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    prefix = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    walls, reports = [], []
    for _ in range(n):
        start = time.perf_counter()
        res = subprocess.run([str(prefix / "bin" / "python"), str(ROOT / "scripts" / "verify_lora.py"), "--json"],
                             capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        reports.append(json.loads(res.stdout))
    print(f"{prefix}: verdict {reports[0]['verdict']}, device {reports[0].get('device')}, medians of {n} runs")
    print(f"  wall (process incl. interpreter start): {statistics.median(walls):.2f} s")
    for key in ("imports_s", "checks_s", "total_s"):
        print(f"  {key:<10} {statistics.median(r['timings'][key] for r in reports):.3f} s")
    names = [c["name"] for c in reports[0]["checks"] if "seconds" in c and not c["name"].startswith("import ")]
    for name in names:
        secs = [next(c["seconds"] for c in r["checks"] if c["name"] == name) for r in reports]
        print(f"  {name:<34} {statistics.median(secs) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
