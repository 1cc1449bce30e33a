"""Benchmark fleet provisioning: 1, 3 and 8 local-connection hosts from one bundle, with a shared package cache.

    python scripts/bench_fleet.py ANSIBLE_VENV [SIZES...]       (default sizes: 1 3 8)

Prints, per fleet size, the playbook's wall time and, per host, the bytes of conda archives read from the bundle
(the shared cache takes the package set once for the fleet, not once per host) and the runtime wheels read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import testchannel  # noqa: E402


def main() -> None:
    ansible = Path(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2:]] or [1, 3, 8]
    with tempfile.TemporaryDirectory(prefix="lorastrap-bench-fleet-") as tmp:
        tmp = Path(tmp)
        bundle = testchannel.offline_bundle(tmp)
        manifest = json.loads((bundle / "manifest.json").read_text())
        wheels = sum(m["size"] for m in (manifest.get("runtime") or {}).get("wheels", {}).values()) + sum(
            m["size"] for rel, m in manifest["files"].items() if rel.startswith("runtime/wheels/"))
        print(f"bundle: {manifest['packages']} packages, {manifest['bytes'] / 2**20:.1f} MiB "
              f"(runtime wheels {wheels / 2**20:.1f} MiB)")
        print("| hosts | wall time | archives read per host (shared cache) | runtime wheels read per host |")
        print("|---|---|---|---|")
        for n in sizes:
            run = tmp / f"fleet{n}"
            (run / "reports").mkdir(parents=True)
            hosts = "\n".join(f"node{i} lorastrap_home={run}/node{i}" for i in range(n))
            (run / "inventory.ini").write_text(
                f"[nodes]\n{hosts}\n\n[nodes:vars]\nansible_connection=local\n"
                f"ansible_python_interpreter=\"{{{{ ansible_playbook_python }}}}\"\nlorastrap_bundle={bundle}\n"
                f"lorastrap_pkgs_dir={run}/shared-pkgs\n")
            env = dict(os.environ, ANSIBLE_HOME=str(run / ".ansible"), ANSIBLE_LOCAL_TEMP=str(run / ".ansible/tmp"),
                       ANSIBLE_REMOTE_TEMP=str(run / ".ansible/rtmp"))
            start = time.perf_counter()
            res = subprocess.run([str(ansible / "bin" / "ansible-playbook"), "-i", str(run / "inventory.ini"),
                                  str(ROOT / "deploy" / "ansible" / "site.yml"), "-e",
                                  f"lorastrap_report_dir={run}/reports", "-f", str(n)], env=env, capture_output=True,
                                 text=True)
            wall = time.perf_counter() - start
            if res.returncode != 0:
                sys.exit(res.stdout[-3000:])
            reports = [json.loads((run / "reports" / f"node{i}.json").read_text()) for i in range(n)]
            per_host = sum(r["downloaded_bytes"] for r in reports) / n
            print(f"| {n} | {wall:.1f} s | {per_host / 2**20:.2f} MiB | {wheels / 2**20:.1f} MiB |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
