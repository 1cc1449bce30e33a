"""Step 5: run scripts/verify_lora.py inside an environment and read its JSON report.

The script runs with the environment's own Python (only its packages and the standard library), offline.  Its
report says, check by check, whether the environment can load a model in 8 bits and LoRA-train it, and for each
failure the likely cause and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorastrap import paths, subproc
from lorastrap.errors import LorastrapError, NO_PROFILE, UsageError, VERIFY

VERIFY_SCRIPT = paths.SCRIPTS / "verify_lora.py"
TIMEOUT_S = 1800


def python_of(prefix: Path) -> Path:
    for candidate in (prefix / "bin" / "python", prefix / "python.exe", prefix / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    raise UsageError(f"{prefix} has no Python (looked for bin/python)",
                     why="verify runs inside a conda environment or virtualenv that has Python",
                     fix="Pass the environment's prefix (the folder with bin/python), or install one first.")


def run(prefix: Path, *, driver_cuda: str | None = None, steps: int = 10, timeout: float = TIMEOUT_S) -> dict:
    """The report of one verification run (never raises for a failing environment; see verdict())."""
    from lorastrap.install import env_in
    argv = [str(python_of(prefix)), str(VERIFY_SCRIPT), "--json", "--steps", str(steps)]
    if driver_cuda:
        argv += ["--driver-cuda", driver_cuda]
    res = subproc.run(argv, timeout=timeout, env=env_in(prefix), cwd=prefix)
    if res.timed_out:
        raise LorastrapError(f"the verification run in {prefix} did not finish within {timeout:.0f} s",
                             why="a hung import or device", fix="Run it by hand to see where it stops: "
                             + " ".join(argv[:2]), exit_code=VERIFY)
    report = parse(res.stdout)
    if report is None:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise LorastrapError(f"the verification run in {prefix} gave no report (exit {res.returncode})",
                             why=" | ".join(tail) or "no output",
                             fix="The environment's Python may be broken; try `lorastrap repair`.",
                             exit_code=VERIFY)
    return report


def parse(stdout: str) -> dict | None:
    """The JSON report printed by verify_lora.py --json (a pretty-printed object, possibly after other output)."""
    start = stdout.find("{")
    while start != -1:
        try:
            doc = json.loads(stdout[start:])
            if isinstance(doc, dict) and "schema_version" in doc:
                return doc
        except ValueError:
            pass
        start = stdout.find("\n{", start + 1)
        start = start + 1 if start != -1 else -1
    return None


def exit_code(report: dict) -> int:
    return {"pass": 0, "unsupported": NO_PROFILE}.get(report.get("verdict"), VERIFY)


def summary(report: dict) -> str:
    lines = []
    for c in report.get("checks", []):
        mark = {"pass": "ok", "fail": "FAIL", "warn": "warn", "unsupported": "n/a"}.get(c["status"], c["status"])
        lines.append(f"[{mark:>4}] {c['name']}: {c['detail']}")
        for key in ("error", "cause", "fix"):
            if c.get(key) and c["status"] != "pass":
                lines.append(f"       {key}: {c[key]}")
    verdict = report.get("verdict")
    if verdict == "unsupported":
        lines.append("verdict: this environment cannot do 8-bit on this machine — " + (report.get("unsupported_reason") or ""))
    else:
        lines.append(f"verdict: {str(verdict).upper()}")
    return "\n".join(lines)
