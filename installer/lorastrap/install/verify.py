"""Step 5: run scripts/verify_lora.py inside an environment and read its JSON report.  The only module that
launches that script (for `verify`, for the install transaction, and for doctor's pre-checks).

The script runs with the environment's own Python (only its packages and the standard library), offline.  Its
report says, check by check, whether the environment can load a model in 8 bits and LoRA-train it, and for each
failure the likely cause and the fix.  The compatibility facts it judges by (the transformers gates' minimum
versions, the int8 fast path's compute capability) come from envs/profiles.yaml (`verify:`), on its command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorastrap.core import paths
from lorastrap.install import prefix as pfx
from lorastrap.core.errors import NO_PROFILE, VERIFY, LorastrapError, UsageError
from lorastrap.matrix.profiles import Matrix, Profile

TIMEOUT_S = 1800
PRE_CHECKS_TIMEOUT_S = 600


def _facts(matrix: Matrix | None) -> list[str]:
    if matrix is None or matrix.verify is None:
        return []
    v = matrix.verify
    return ["--int8-min-cc", v.int8_fast_path_min_cc.value, "--accelerate-min", v.accelerate_min.value,
            "--bitsandbytes-min", v.bitsandbytes_min.value]


def _argv(template: list[str], prefix: Path, matrix: Matrix | None, driver_cuda: str | None,
          python: Path | None = None) -> list[str]:
    """A profile's verify command ("{verify_script}" replaced), its first word resolved in the environment (or
    PYTHON, an interpreter given by path)."""
    argv = [a.replace("{verify_script}", str(paths.VERIFY_SCRIPT)) for a in template]
    if argv and argv[0] == "python":
        python = python or pfx.python_of(prefix)
        if python is None:
            raise UsageError(f"{prefix} has no Python (looked for bin/python)",
                             why="verify runs inside a conda environment or virtualenv that has Python",
                             fix="Pass the environment's prefix (the folder with bin/python), or install one first.")
        argv[0] = str(python)
    if str(paths.VERIFY_SCRIPT) in argv:
        argv += _facts(matrix) + (["--driver-cuda", driver_cuda] if driver_cuda else [])
    return argv


def start_timeout() -> float:
    """Seconds the environment's Python may take to start and exit (LORASTRAP_PYTHON_START_TIMEOUT, default 120)."""
    try:
        return max(0.5, float(os.environ.get("LORASTRAP_PYTHON_START_TIMEOUT") or 120))
    except ValueError:
        return 120.0


def _starts(prefix: Path, python: str, driver_cuda: str | None) -> None:
    """A hung interpreter (a sitecustomize or .pth that never returns) is found in START_TIMEOUT, not after the whole
    verification's timeout."""
    limit = start_timeout()
    res = pfx.run_in(prefix, [python, "-c", "pass"], timeout=limit, driver_cuda=driver_cuda)
    if res.timed_out:
        raise LorastrapError(f"the Python of {prefix} did not start and exit within {limit:.0f} s",
                             why="it hangs before running anything (a sitecustomize, a .pth file, a hung "
                                 "filesystem)", fix=f"Run `{python} -c pass` by hand to see where it stops; "
                                                    "`lorastrap repair` rebuilds the environment.", exit_code=VERIFY)


def run(prefix: Path, *, matrix: Matrix | None, driver_cuda: str | None = None, steps: int = 10,
        pre_checks_only: bool = False, command: list[str] | None = None, timeout: float = TIMEOUT_S,
        python: Path | None = None) -> tuple[dict | None, object]:
    """Run the verification (a profile's ``command``, or verify_lora.py itself) in PREFIX (with PYTHON when given:
    any interpreter, its prefix being PREFIX).

    Returns (report or None when it printed none, the subprocess result)."""
    template = command or ["python", "{verify_script}", "--json", "--steps", str(steps)]
    if pre_checks_only:
        template = ["python", "{verify_script}", "--json", "--pre-checks-only"]
    argv = _argv(template, prefix, matrix, driver_cuda, python)
    if argv[0].endswith(("python", "python3", "python.exe")) or python is not None:
        _starts(prefix, argv[0], driver_cuda)
    res = pfx.run_in(prefix, argv, timeout=timeout, driver_cuda=driver_cuda)
    if res.timed_out:
        raise LorastrapError(f"the verification run in {prefix} did not finish within {timeout:.0f} s",
                             why="a hung import or device", fix="Run it by hand to see where it stops: "
                             + " ".join(argv[:2]), exit_code=VERIFY)
    return parse(res.stdout), res


def report(prefix: Path, *, matrix: Matrix | None, driver_cuda: str | None = None, steps: int = 10) -> dict:
    """The report of one verification run (`lorastrap verify`): never raises for a failing environment."""
    doc, res = run(prefix, matrix=matrix, driver_cuda=driver_cuda, steps=steps)
    if doc is None:
        raise LorastrapError(f"the verification run in {prefix} gave no report (exit {res.returncode})",
                             why=res.tail(), fix="The environment's Python may be broken; try `lorastrap repair`.",
                             exit_code=VERIFY)
    return doc


def verify_profile(prefix: Path, profile: Profile, *, matrix: Matrix | None, driver_cuda: str | None) -> dict:
    """The install transaction's verification: the profile's own command; raises VerifyError-coded on failure."""
    doc, res = run(prefix, matrix=matrix, driver_cuda=driver_cuda, command=profile.verify)
    if not res.ok:
        failed = [f"{c['name']}: {c.get('cause') or c['detail']}" for c in (doc or {}).get("checks", [])
                  if c["status"] == "fail"]
        raise LorastrapError("the new environment failed verification: " + " ".join(profile.verify),
                             why="; ".join(failed[:3]) or res.tail(),
                             fix="Nothing changed: the previous environment was restored. "
                                 "Run `lorastrap plan` to check the profile fits.", exit_code=VERIFY)
    return {"ok": True, "command": profile.verify, "verdict": (doc or {}).get("verdict", "pass"), "report": doc}


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


def as_result(report: dict) -> dict:
    """The report as `lorastrap verify` hands it on: its exit_code is the process's (the script's own is kept as
    script_exit_code)."""
    out = dict(report)
    if "exit_code" in out:
        out["script_exit_code"] = out["exit_code"]
    out["exit_code"] = exit_code(report)
    return out


def summary(report: dict) -> str:
    lines = []
    for c in report.get("checks", []):
        mark = {"pass": "ok", "fail": "FAIL", "warn": "warn", "unsupported": "n/a"}.get(c["status"], c["status"])
        lines.append(f"[{mark:>4}] {c['name']}: {c['detail']}")
        for key in ("error", "cause", "fix"):
            if c.get(key) and c["status"] != "pass":
                lines.append(f"       {key}: {c[key]}")
    verdict = report.get("verdict")
    if report.get("error"):  # the verification script itself failed (an import, a crash): its reason
        lines.append(f"error: {report['error']}")
    if verdict == "unsupported":
        lines.append("verdict: this environment cannot do 8-bit on this machine — " + (report.get("unsupported_reason") or ""))
    else:
        lines.append(f"verdict: {str(verdict).upper()}")
    return "\n".join(lines)
