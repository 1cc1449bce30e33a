"""Benchmark doctor on a clean environment of the test channel (40 packages): wall time with and without the
import pre-checks, medians over N runs (target: <= 2 s without them).   python scripts/bench_doctor.py [N]"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import testchannel  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-doctor-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(tmp / "tc")],
                       check=True, capture_output=True)
        server, url = testchannel.serve(tmp / "tc")
        env = dict(os.environ, LORASTRAP_HOME=str(tmp / "home"))
        envs = str(ROOT / "tests" / "envs")
        prefix = str(tmp / "env")
        subprocess.run([sys.executable, "-m", "lorastrap", "install", "--envs-dir", envs, "--channel", f"{url}/channel",
                        "--pip-index-url", f"{url}/simple", "--prefix", prefix], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        files = sum(1 for _ in Path(prefix).rglob("*") if _.is_file())
        for label, extra in (("without import checks", ["--no-imports"]), ("with import checks", [])):
            times = []
            for _ in range(n):
                start = time.perf_counter()
                res = subprocess.run([sys.executable, "-m", "lorastrap", "doctor", "--envs-dir", envs, "--prefix",
                                      prefix, *extra], cwd=ROOT, env=env, capture_output=True)
                times.append(time.perf_counter() - start)
                assert res.returncode == 0, res.stdout
            print(f"doctor {label}: median {statistics.median(times):.2f} s over {n} runs "
                  f"(40 packages, {files} files, all hashed)")
        server.shutdown()


if __name__ == "__main__":
    main()
