"""The one module that starts processes: the NVML probe, engines, pip, the verification run.

Output is captured (stdout and stderr apart, read together so no pipe can fill and deadlock), every call has a
timeout, and on a timeout or an interrupt the whole process group is killed.  On Linux every child also gets
SIGKILL when lorastrap itself dies (PR_SET_PDEATHSIG); a child's own children (pip re-running itself under the
environment's Python) stay in its process group, which the transaction records so the next run can end them.
The environment passed in
is taken as is; callers build it with ``clean_env`` so a user's conda configuration or ``CUDA_VISIBLE_DEVICES``
cannot leak in by accident.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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

    def tail(self, lines: int = 3) -> str:
        """The last lines of what it printed (stderr first), for a one-line "why"."""
        text = (self.stderr or self.stdout or "").strip().splitlines()
        return " | ".join(text[-lines:]) or ("timed out" if self.timed_out else f"exit code {self.returncode}")


def clean_env(drop: tuple[str, ...] = (), prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The current environment without the named variables and variable prefixes, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env.update(extra)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when lorastrap dies (even by SIGKILL), so no orphan keeps writing."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_PREEXEC = _die_with_parent if sys.platform.startswith("linux") else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _communicate(proc: subprocess.Popen, stdin: str | None, timeout: float) -> tuple[str, str, bool]:
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return out or "", err or "", False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return out or "", err or "", True
    except BaseException:  # Ctrl-C or SIGTERM while waiting: the child goes with us
        _kill_group(proc)
        proc.wait()
        raise


_GROUPS: list[Path] = []  # where the process groups of the children started now are recorded


@contextmanager
def recording_groups(path: Path):
    """Record the process group of every child started inside the block in PATH (one id a line, written as soon
    as the child is started).  A child's own children stay in its group but do not get
    the death signal: after a SIGKILL of lorastrap the next run kills what is left of these groups
    (``kill_recorded_groups``).  The file is removed when the block ends."""
    _GROUPS.append(path)
    try:
        yield
    finally:
        _GROUPS.remove(path)
        path.unlink(missing_ok=True)


def _record(pid: int) -> None:
    for path in _GROUPS:
        with open(path, "a") as f:
            f.write(f"{pid}\n")
            f.flush()
            os.fsync(f.fileno())


def kill_recorded_groups(path: Path) -> int:
    """Kill (SIGKILL) the processes still in the groups recorded in PATH by a run that died; remove PATH.  Returns
    how many processes were killed.  A group id is trusted only for processes that are still in that group."""
    try:
        groups = {int(x) for x in path.read_text().split()}
    except (OSError, ValueError):
        groups = set()
    killed = 0
    for proc in Path("/proc").iterdir() if groups else []:
        if not proc.name.isdigit():
            continue
        try:
            pgid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgid in groups and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    path.unlink(missing_ok=True)
    return killed


def _popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """Every child: its own session (process group), the death signal, and its group recorded."""
    proc = subprocess.Popen(argv, text=True, start_new_session=True, preexec_fn=_PREEXEC, **kwargs)
    _record(proc.pid)
    return proc


def _start(argv: list[str], env: dict[str, str] | None, cwd: str | Path | None = None,
           stdin: str | None = None) -> subprocess.Popen:
    return _popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, env=env, cwd=cwd)


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        stdin: str | None = None) -> Result:
    proc = _start(argv, env, cwd, stdin)
    out, err, timed_out = _communicate(proc, stdin, timeout)
    return Result(argv, None if timed_out else proc.returncode, out, err, timed_out=timed_out)


def python_modules(calls: list[tuple[str, dict[str, str]]], *, timeout: float) -> list[Result]:
    """Run several ``python -m lorastrap.<module>`` (module, env) at once; each has ``timeout`` from the start.

    A hung one is killed at its deadline without delaying the others' answers."""
    started = time.monotonic()
    procs: list[tuple[list[str], subprocess.Popen]] = []
    try:
        for module, env in calls:
            argv = [sys.executable, "-m", f"lorastrap.{module}"]
            procs.append((argv, _start(argv, env)))
        results = []
        for argv, proc in procs:
            left = max(0.01, timeout - (time.monotonic() - started))
            out, err, timed_out = _communicate(proc, None, left)
            results.append(Result(argv, None if timed_out else proc.returncode, out, err, timed_out=timed_out))
        return results
    except BaseException:  # Ctrl-C or SIGTERM: none of them outlives us
        for _, proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        raise


def python_module(module: str, *args: str, timeout: float, env: dict[str, str] | None = None,
                  stdin: str | None = None) -> Result:
    """Run ``python -m lorastrap.<module>`` with this interpreter (lorastrap is importable there: it is this one)."""
    return run([sys.executable, "-m", f"lorastrap.{module}", *args], timeout=timeout, env=env, stdin=stdin)


def worker(module: str, request: dict, *, timeout: float, show_progress: bool = False) -> dict:
    """Run ``lorastrap.<module>`` with a JSON request; return the JSON answer it wrote to its result file.

    The answer file, not the exit code, is the outcome (py-rattler may crash at shutdown after succeeding).
    No answer at all means the worker died before finishing."""
    with tempfile.TemporaryDirectory(prefix="lorastrap-worker-") as tmp:
        result = Path(tmp) / "result.json"
        request = {**request, "result": str(result), "show_progress": show_progress}
        proc = _popen([sys.executable, "-m", f"lorastrap.{module}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=None if show_progress else subprocess.PIPE)  # progress bars: the terminal
        out, err, timed_out = _communicate(proc, json.dumps(request), timeout)
        if timed_out:
            return {"ok": False, "error": f"the engine did not finish within {timeout:.0f} s", "timed_out": True}
        if result.exists():
            answer = json.loads(result.read_text())
            answer["exit_code"] = proc.returncode
            return answer
        tail = Result([], proc.returncode, out, err or "").tail()
        return {"ok": False, "error": f"the engine exited with {proc.returncode} before answering: {tail}",
                "exit_code": proc.returncode}


def become(argv: list[str], *, extra_env: dict[str, str] | None = None) -> None:
    """Replace this process with ARGV (exec): it keeps the pid, the terminal, stdin/stdout and every signal sent
    to lorastrap, and its exit code is the one the caller sees.  Never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **(extra_env or {})})
