"""Benchmark setup.sh: `sh setup.sh --dry-run` with the runtime already there (target <= 2 s), and the time to
create the runtime from scratch (a fresh data dir).   python scripts/bench_setup.py [N]"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SH = shutil.which("dash") or "/bin/sh"


def run(home: Path) -> float:
    env = dict(os.environ, LORASTRAP_HOME=str(home))
    start = time.perf_counter()
    res = subprocess.run([SH, str(ROOT / "setup.sh"), "--dry-run"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        sys.exit(res.stderr.decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-setup-") as tmp:
        home = Path(tmp) / "data"
        create = run(home)  # creates the runtime (pip, hashes required) and answers
        reuse = [run(home) for _ in range(n)]
    print(f"setup.sh --dry-run, fresh data dir (runtime created from requirements.txt): {create:.1f} s")
    print(f"setup.sh --dry-run, runtime present, median of {n}: {statistics.median(reuse):.2f} s (target <= 2 s)")


if __name__ == "__main__":
    main()
