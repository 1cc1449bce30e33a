"""The one module that starts processes: the NVML probe, engines, pip, the verification run.

Output is captured (stdout and stderr apart, read together so no pipe can fill and deadlock), every call has a
timeout, and on a timeout the whole process group is killed.  The environment passed in is taken as is; callers
build it with ``clean_env`` so a user's conda configuration or ``CUDA_VISIBLE_DEVICES`` cannot leak in by accident.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `python -m installer` runs from here


@dataclass
class Result:
    argv: list[str]
    returncode: int | None  # None when it timed out
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def clean_env(drop: tuple[str, ...] = (), prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The current environment without the named variables and variable prefixes, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env.update(extra)
    return env


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        stdin: str | None = None) -> Result:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            env=env, cwd=cwd, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return Result(argv, None, out or "", err or "", timed_out=True)
    except BaseException:  # Ctrl-C while waiting: the child goes with us
        _kill_group(proc)
        proc.wait()
        raise
    return Result(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _checkout_first(env: dict[str, str] | None) -> dict[str, str]:
    """The environment with the checkout first on PYTHONPATH, so pypa's `installer` cannot win (-I is not used:
    the runtime's site-packages are needed)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def python_module(module: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m installer.<module>`` from the checkout with this interpreter."""
    return run([sys.executable, "-m", f"installer.{module}", *args], timeout=timeout, env=_checkout_first(env),
               cwd=ROOT)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when lorastrap dies (even by SIGKILL), so no orphan keeps writing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def worker(module: str, request: dict, *, timeout: float, show_progress: bool = False) -> dict:
    """Run ``installer.<module>`` with a JSON request; return the JSON answer it wrote to its result file.

    The answer file, not the exit code, is the outcome (py-rattler may crash at shutdown after succeeding).
    No answer at all means the worker died before finishing."""
    import json
    import tempfile
    with tempfile.TemporaryDirectory(prefix="lorastrap-worker-") as tmp:
        result = Path(tmp) / "result.json"
        request = {**request, "result": str(result)}
        env = _checkout_first(None)
        argv = [sys.executable, "-m", f"installer.{module}"]
        request["show_progress"] = show_progress
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=None if show_progress else subprocess.PIPE,  # progress bars: the terminal
                                text=True, env=env, cwd=ROOT, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            out, err = proc.communicate(json.dumps(request), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return {"ok": False, "error": f"the engine did not finish within {timeout:.0f} s", "timed_out": True}
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        if result.exists():
            answer = json.loads(result.read_text())
            answer["exit_code"] = proc.returncode
            return answer
        tail = (err or out or "").strip().splitlines()[-3:]
        return {"ok": False, "error": f"the engine exited with {proc.returncode} before answering: "
                                      + (" | ".join(tail) or "no output"), "exit_code": proc.returncode}
