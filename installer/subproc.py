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


def python_module(module: str, *args: str, timeout: float, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m installer.<module>`` from the checkout with this interpreter (-I is not used: the
    runtime's site-packages are needed; the checkout goes first on PYTHONPATH so pypa's `installer` cannot win)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return run([sys.executable, "-m", f"installer.{module}", *args], timeout=timeout, env=env, cwd=ROOT)
