"""Join the node reports (one JSON per host, as `setup.sh --report` writes them) into one fleet report.

    python fleet_report.py REPORT_DIR --hosts h1,h2,... [--out fleet.json]

A host with no report never answered (unreachable); a report with ok=false is a failed host.  Hosts are sorted so
the output is the same from run to run.  Prints a table; writes the JSON (schema_version 1) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(host: str, report: dict | None) -> dict:
    if report is None:
        return {"host": host, "status": "unreachable", "profile": None, "gpus": [], "versions": {},
                "verify": None, "duration_s": None, "changed": None, "error": "no report (host unreachable?)"}
    if not report.get("ok", False):
        return {"host": host, "status": "failed", "profile": None, "gpus": [], "versions": {}, "verify": None,
                "duration_s": None, "changed": None, "error": report.get("error"), "exit_code": report.get("exit_code")}
    if report.get("check_mode"):
        plan = report.get("plan") or {}
        return {"host": host, "status": "planned", "profile": plan.get("profile"), "gpus": [], "versions": {},
                "verify": None, "duration_s": None, "changed": False, "error": None}
    return {"host": host, "status": "ok", "profile": report.get("profile"),
            "gpus": (report.get("machine") or {}).get("gpus", []), "versions": report.get("versions", {}),
            "verify": report.get("verify_verdict"), "duration_s": round((report.get("timings") or {}).get("total", 0), 2),
            "changed": report.get("changed"), "prefix": report.get("prefix"), "error": None}


def table(rows: list[dict]) -> str:
    head = ["host", "status", "profile", "GPU", "torch", "transformers", "peft", "bitsandbytes", "verify", "time"]
    lines = [head]
    for r in rows:
        v = r["versions"]
        lines.append([r["host"], r["status"], r["profile"] or "-", ", ".join(r["gpus"]) or "none",
                      (v.get("pytorch") or "-").split(" ")[0], (v.get("transformers") or "-").split(" ")[0],
                      (v.get("peft") or "-").split(" ")[0], (v.get("bitsandbytes") or "-").split(" ")[0],
                      r["verify"] or "-", f"{r['duration_s']} s" if r["duration_s"] is not None else "-"])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    for r in rows:
        if r["error"]:
            out.append(f"{r['host']}: {r['error']}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--hosts", required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for host in sorted(h for h in args.hosts.split(",") if h):
        path = args.report_dir / f"{host}.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = None
        rows.append(row(host, report))
    summary = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "planned", "failed", "unreachable")}
    fleet = {"schema_version": 1, "hosts": rows, "summary": summary}
    if args.out:
        args.out.write_text(json.dumps(fleet, indent=2, sort_keys=True) + "\n")
    print(table(rows))
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
