"""Benchmark: median wall time of `lorastrap detect --json` and `plan --json`, interpreter start
included, over N runs (default 15).   python scripts/bench_detect.py [N]"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_s(args: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorastrap", *args], cwd=ROOT, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    detect = median_s(["detect", "--json"], n)
    plan = median_s(["plan", "--json"], n)
    print(f"runs per command: {n}")
    print(f"detect --json median: {detect:.3f} s   (target <= 0.5 s)")
    print(f"plan --json   median: {plan:.3f} s   (plan adds {plan - detect:+.3f} s; target <= 0.1 s)")


if __name__ == "__main__":
    main()
