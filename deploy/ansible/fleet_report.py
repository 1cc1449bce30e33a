"""Join the node reports (one JSON per host, as `setup.sh --report` writes them) into one fleet report.

    python fleet_report.py REPORT_DIR --hosts h1,h2,... [--out fleet.json]

A host with no report never answered (unreachable); a report with ok=false is a failed host.  Hosts are sorted so
the output is the same from run to run.  Prints a table; writes the JSON (schema_version 1) to --out.

Also a library: lorastrap's Slurm path (`lorastrap fleet`) builds its fleet report with `build`, `table` and
`summary_line`, naming its own status for a node with no report ("not-started": the scheduler never ran it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


STATUSES = ("ok", "planned", "failed", "unreachable")
NO_REPORT = ("unreachable", "no report (host unreachable?)")


def _identity(report: dict) -> dict:
    """What identifies a node's run: its bundle, lock, lorastrap, when it ended, its log, why it got its profile."""
    bundle = report.get("bundle") or {}
    return {"bundle": bundle.get("id"), "bundle_path": bundle.get("path"), "bundle_created": bundle.get("created"),
            "lock": (report.get("lock_digest") or "")[:16] or None, "lorastrap": report.get("lorastrap_version"),
            "finished_at": report.get("finished_at"), "log": report.get("log"), "reason": report.get("reason")
            or _reason(report.get("plan"))}


def _reason(plan: dict | None) -> str | None:
    if not plan:
        return None
    if plan.get("forced"):
        return f"forced ({(plan.get('reasons') or ['--profile'])[0]})"
    return "; ".join((plan.get("reasons") or [])[:2]) or None


def _one_line(text) -> str | None:
    if not text:
        return text
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else None


def row(host: str, report: dict | None, missing: tuple[str, str] = NO_REPORT) -> dict:
    """One host's row; missing: the (status, error) of a host with no report."""
    if report is None:
        return {"host": host, "status": missing[0], "profile": None, "gpus": [], "versions": {},
                "verify": None, "duration_s": None, "changed": None, "error": missing[1], "reason": None,
                "bundle": None, "lock": None, "lorastrap": None, "finished_at": None, "log": None}
    gpus = (report.get("machine") or {}).get("gpus", [])
    if not report.get("ok", False):
        return {"host": host, "status": "failed", "profile": report.get("profile"), "gpus": gpus, "versions": {},
                "verify": None, "duration_s": None, "changed": None, "error": _one_line(report.get("error")),
                "why": report.get("why"), "fix": report.get("fix"), "exit_code": report.get("exit_code"),
                **_identity(report)}
    if report.get("check_mode"):
        plan = report.get("plan") or {}
        return {"host": host, "status": "planned", "profile": plan.get("profile"), "gpus": gpus, "versions": {},
                "verify": None, "duration_s": None, "changed": False, "error": None, **_identity(report)}
    return {"host": host, "status": "ok", "profile": report.get("profile"), "gpus": gpus,
            "versions": report.get("versions", {}), "verify": report.get("verify_verdict"),
            "duration_s": round((report.get("timings") or {}).get("total", 0), 2), "changed": report.get("changed"),
            "repaired": report.get("repaired"), "prefix": report.get("prefix"), "error": None, **_identity(report)}


def _changed(r: dict) -> str:
    if r["changed"] is None:
        return "-"
    return "repaired" if r.get("repaired") else "yes" if r["changed"] else "no"


def table(rows: list[dict]) -> str:
    head = ["host", "status", "changed", "profile", "GPU", "torch", "transformers", "peft", "bitsandbytes", "verify",
            "bundle", "time"]
    lines = [head]
    for r in rows:
        v = r["versions"]
        lines.append([r["host"], r["status"], _changed(r), r["profile"] or "-", ", ".join(r["gpus"]) or "none",
                      (v.get("pytorch") or "-").split(" ")[0], (v.get("transformers") or "-").split(" ")[0],
                      (v.get("peft") or "-").split(" ")[0], (v.get("bitsandbytes") or "-").split(" ")[0],
                      r["verify"] or "-", (r.get("bundle") or "-")[:12],
                      f"{r['duration_s']} s" if r["duration_s"] is not None else "-"])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    for r in rows:
        if r.get("reason") and r["profile"]:
            out.append(f"{r['host']}: {r['profile']} because {r['reason']}")
    for r in rows:
        if r.get("repaired"):
            out.append(f"{r['host']}: repaired: {r['repaired']}")
    for r in rows:
        if r["error"]:
            out.append(f"{r['host']}: {r['error']}" + (f" (log: {r['log']})" if r.get("log") else ""))
    seen = {}
    for r in rows:
        if r.get("bundle"):
            seen.setdefault((r["bundle"], r.get("lock"), r.get("bundle_path"), r.get("bundle_created")), []).append(r["host"])
    for (bid, lock, path, created), hosts in sorted(seen.items(), key=lambda kv: kv[1]):
        out.append(f"bundle {bid[:12]}: {path} (made {created or '?'}), lock {(lock or '?')[:12]}: "
                   + ", ".join(hosts))
    return "\n".join(out)


def build(report_dir: Path, hosts: list[str], missing: dict[str, tuple[str, str]] | None = None) -> dict:
    """The fleet report (schema_version 1) from REPORT_DIR/HOST.json; missing: (status, error) per host without one."""
    rows = []
    for host in sorted(set(hosts)):
        try:
            report = json.loads((report_dir / f"{host}.json").read_text())
        except (OSError, ValueError):
            report = None
        rows.append(row(host, report, (missing or {}).get(host, NO_REPORT)))
    statuses = list(STATUSES) + sorted({r["status"] for r in rows} - set(STATUSES))
    summary = {s: sum(1 for r in rows if r["status"] == s) for s in statuses}
    return {"schema_version": 1, "hosts": rows, "summary": summary}


def summary_line(fleet: dict) -> str:
    return "summary: " + ", ".join(f"{k} {v}" for k, v in fleet["summary"].items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--hosts", required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    fleet = build(args.report_dir, [h for h in args.hosts.split(",") if h])
    if args.out:
        args.out.write_text(json.dumps(fleet, indent=2, sort_keys=True) + "\n")
    print(table(fleet["hosts"]))
    print(summary_line(fleet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
