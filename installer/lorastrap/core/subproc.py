"""The one module that starts processes: the NVML probe, engines, pip, the verification run.

Output is captured (stdout and stderr apart, read together so no pipe can fill and deadlock), every call has a
timeout, and on a timeout or an interrupt the whole process group is killed.  On Linux every child also gets
SIGKILL when lorastrap itself dies (PR_SET_PDEATHSIG, set by setpriv or a small exec shim — see
``with_death_signal``); a child's own children (pip re-running itself under the environment's Python) inherit the
token of the transaction's children record, so the next run can end them and nothing else.
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
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lorastrap.core import fsutil


class Result:
    """What a child did: its argv, exit code (None when it timed out) and output.  (A plain class, not a dataclass:
    this module is imported before the worker started ahead, and the dataclasses module costs ~7 ms.)"""

    __slots__ = ("argv", "returncode", "stdout", "stderr", "timed_out")

    def __init__(self, argv: list[str], returncode: int | None, stdout: str, stderr: str, timed_out: bool = False):
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr
        self.timed_out = timed_out

    def __repr__(self) -> str:
        return (f"Result(argv={self.argv!r}, returncode={self.returncode!r}, stdout={self.stdout!r}, "
                f"stderr={self.stderr!r}, timed_out={self.timed_out!r})")

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


# The death signal (Linux): set in the child by a program it execs first, never by Python code between fork and exec
# (a preexec_fn in a threaded parent can deadlock, and a failure there went unseen).  setpriv (util-linux) when
# present, else a few lines of Python that set it with prctl, check the parent is still the one that started it
# (a parent that died before the signal was set would never send it), then exec the command.  Either failing is a
# failure to start, never a child running silently without it.
_SHIM = ("import ctypes, os, sys\n"
         "if ctypes.CDLL(None, use_errno=True).prctl(1, 9) != 0:\n"  # PR_SET_PDEATHSIG, SIGKILL
         "    sys.exit('lorastrap: cannot set the death signal: errno %d' % ctypes.get_errno())\n"
         "if os.getppid() != int(sys.argv[1]):\n"
         "    os._exit(137)\n"  # lorastrap died already: so do we
         "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _setpriv() -> str | None:
    import shutil
    exe = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    return exe if exe and sys.platform.startswith("linux") else None


_SETPRIV = _setpriv() if sys.platform.startswith("linux") else None


def with_death_signal(argv: list[str]) -> list[str]:
    """ARGV started so that it gets SIGKILL when lorastrap dies (Linux; elsewhere the children record covers it)."""
    if not sys.platform.startswith("linux"):
        return argv
    if _SETPRIV and os.environ.get("LORASTRAP_DEATH_SIGNAL") != "shim":
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *argv]


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


# The children record: PREFIX.lorastrap-children (txn.children_path), one JSON object a line.  The first line is
# written before any child starts: {"token", "host", "boot_id"}; every child gets the token in its environment
# (LORASTRAP_CHILD_OF), which its own children inherit.  Then a line per child, as it is started: {"pid", "start"}
# (the start time from /proc/PID/stat, in clock ticks since boot).  A process is taken for one of the record's only
# when it is on this host, in this boot, and carries the token (or is the recorded pid with the recorded start
# time): a pid or process group reused after a reboot, or a process of another node sharing the prefix over NFS, is
# never touched.
TOKEN_VAR = "LORASTRAP_CHILD_OF"
_RECORDS: list[tuple[Path, str]] = []  # (record file, token) of the blocks open now


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _append(path: Path, doc: dict) -> None:
    """One line, written and closed (no fsync: the record serves the next run on this host in this boot, which
    reads the kernel's copy even after this process was killed; after a reboot it touches nothing, whatever the
    file holds, and a torn line reads as no record)."""
    with open(path, "a") as f:
        f.write(json.dumps(doc) + "\n")


@contextmanager
def recording_groups(path: Path):
    """Record every child started inside the block in PATH (see above); the file is removed when the block ends.
    Nested blocks for the same PATH share the outer one's record."""
    if any(p == path for p, _ in _RECORDS):
        yield
        return
    token = os.urandom(16).hex()  # what secrets.token_hex(16) returns, without its imports
    _append(path, {"token": token, "host": fsutil.hostname(), "boot_id": boot_id()})
    _RECORDS.append((path, token))
    try:
        yield
    finally:
        _RECORDS.remove((path, token))
        path.unlink(missing_ok=True)


def _child_env(env: dict[str, str] | None) -> dict[str, str] | None:
    if not _RECORDS:
        return env
    out = dict(os.environ if env is None else env)
    out[TOKEN_VAR] = ",".join(tok for _, tok in _RECORDS)
    return out


def _record(pid: int) -> None:
    for path, _ in _RECORDS:
        _append(path, {"pid": pid, "start": start_time(pid)})


def _carries(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    for item in environ:
        if item.startswith(TOKEN_VAR.encode() + b"="):
            return token.encode() in item[len(TOKEN_VAR) + 1:].split(b",")
    return False


def kill_recorded_groups(path: Path, *, narrate=lambda m: None) -> int:
    """Kill (SIGKILL) what is left of the children recorded in PATH by a run that died; remove PATH.  Returns how
    many processes were killed.  Only processes of this host and boot that carry the record's token, or are a
    recorded pid with its recorded start time, are touched."""
    if any(p == path for p, _ in _RECORDS):
        return 0  # this run's own record, open now (repair holds it around the install transaction)
    try:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        head = lines[0] if lines and isinstance(lines[0], dict) else {}
    except (OSError, ValueError):
        lines, head = [], {}
    token = head.get("token")
    if lines and (head.get("host") != fsutil.hostname() or head.get("boot_id") != boot_id() or not token):
        narrate(f"{path}: recorded on {head.get('host') or 'an unknown host'}"
                + ("" if head.get("host") != fsutil.hostname() else " before a reboot")
                + ": no process of it is touched")
        path.unlink(missing_ok=True)
        return 0
    recorded = {(d.get("pid"), d.get("start")) for d in lines[1:] if isinstance(d, dict)}
    killed = 0
    me = os.getpid()
    for proc in Path("/proc").iterdir() if token else []:
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        pid = int(proc.name)
        if _carries(pid, token) or (pid, start_time(pid)) in recorded:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    path.unlink(missing_ok=True)
    return killed


def _resolve(exe: str, env: dict[str, str] | None) -> None:
    import errno
    import shutil
    if "/" in exe:
        if not os.path.exists(exe):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), exe)
        if not os.access(exe, os.X_OK) or os.path.isdir(exe):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), exe)
    elif shutil.which(exe, path=(env if env is not None else os.environ).get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), exe)


def _popen(argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Every child: its own session (process group), the death signal (an exec'd helper sets it), the record's
    token in its environment, and its pid recorded."""
    _resolve(argv[0], env)  # a missing program fails here as Popen itself would, not inside the helper
    proc = subprocess.Popen(with_death_signal(argv), text=True, start_new_session=True, env=_child_env(env),
                            **kwargs)
    _record(proc.pid)
    return proc


def own_python(module: str, *args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of ``python -S -m lorastrap.MODULE ARGS``, this interpreter: without the site module (its .pth
    files, ~5 ms of each start on a runtime with setuptools' distutils-precedence.pth and an editable install),
    the folders it would have added given instead, as this process has them: its sys.path on PYTHONPATH — every
    entry but "" (the current folder of whatever reads it: -m puts the child's own first, unless PYTHONSAFEPATH
    says not to, as it said to this process) and the standard library's own three, which the interpreter puts
    there itself (nothing of another Python's could be shadowed by them, were the variable to reach one).  An
    entry that is the current folder too is kept: it may be where lorastrap is (a .pth naming it, PYTHONPATH)."""
    stdlib = os.path.dirname(os.__file__)
    own = {"", stdlib, os.path.join(stdlib, "lib-dynload"),
           os.path.join(os.path.dirname(stdlib), f"python{sys.version_info[0]}{sys.version_info[1]}.zip")}
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p not in own)
    return [sys.executable, "-S", "-m", f"lorastrap.{module}", *args], env


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
            argv, env = own_python(module, env=env)
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
    """Run ``python -S -m lorastrap.<module>`` with this interpreter (own_python: lorastrap is importable there)."""
    argv, env = own_python(module, *args, env=env)
    return run(argv, timeout=timeout, env=env, stdin=stdin)


class Worker:
    """A ``python -m lorastrap.<module>`` started now, that answers one JSON request later (``ask``): its start-up
    (the interpreter, py-rattler's import) overlaps whatever this process does meanwhile.  One that is never asked
    reads the end of its stdin and leaves (``discard``, or this process's exit closing the pipe)."""

    def __init__(self, module: str, *args: str, show_progress: bool = False):
        self.module, self.show_progress = module, show_progress
        argv, env = own_python(module, *args)
        self.proc = _popen(argv, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=None if show_progress else subprocess.PIPE)
        self.recorded_in = {path for path, _ in _RECORDS}
        self.sent, self._queue, self._feeder, self._closed = False, None, None, False
        self._sending = threading.Lock()  # the feeder started once; nothing queued after the answered request

    def send(self, request: dict) -> bool:
        """A request it carries out before the one ``ask`` sends (one JSON line), from any thread, never waiting:
        a thread of its own writes them to the worker's stdin, whose pipe fills while the worker is busy (one
        unpacking holds its GIL, so it reads nothing meanwhile).  False when the worker has gone already, or the
        request it answers was sent (or it was let go)."""
        if self.proc.poll() is not None:
            return False
        with self._sending:
            if self._closed:
                return False
            self._start_feeder()
            self._queue.put(json.dumps(request) + "\n")
            self.sent = True
        return True

    def _start_feeder(self) -> None:  # under self._sending
        if self._feeder is None:
            import queue
            self._queue = queue.SimpleQueue()
            self._feeder = threading.Thread(target=self._feed, args=(self.proc.stdin,), name="lorastrap-worker-feed",
                                            daemon=True)
            self._feeder.start()

    def _feed(self, stdin) -> None:
        """Owns STDIN: writes the queued lines, and closes it at the end of the queue (None)."""
        try:
            while (line := self._queue.get()) is not None:
                stdin.write(line)
                stdin.flush()
        except (OSError, ValueError):  # it has gone (BrokenPipeError), or its stdin was closed: nothing more
            pass
        finally:
            try:
                stdin.close()
            except (OSError, ValueError):
                pass

    def _fed(self, last: str | None = None) -> bool:
        """No more requests (LAST, if given, is the final one): the feeder writes what is queued, then closes the
        worker's stdin.  True when a feeder was running (it owns stdin from now on)."""
        with self._sending:
            self._closed = True
            if self._feeder is None:
                return False
            if last is not None:
                self._queue.put(last)
            self._queue.put(None)
            return True

    def ask(self, request: dict, *, timeout: float) -> dict:
        """Send REQUEST; return the JSON answer the worker wrote to its result file.

        The answer file, not the exit code, is the outcome (py-rattler may crash at shutdown after succeeding).
        No answer at all means the worker died before finishing."""
        import tempfile
        with tempfile.TemporaryDirectory(prefix="lorastrap-worker-") as tmp:
            result = Path(tmp) / "result.json"
            request = {**request, "result": str(result), "show_progress": self.show_progress}
            for path, _ in _RECORDS:  # started before a children record opened: recorded now, before it works
                if path not in self.recorded_in:
                    _append(path, {"pid": self.proc.pid, "start": start_time(self.proc.pid)})
                    self.recorded_in.add(path)
            try:
                if self._fed(json.dumps(request) + "\n"):  # the feeder writes it after the others: only read here
                    self.proc.stdin = None
                    out, err, timed_out = _communicate(self.proc, None, timeout)
                    self._feeder.join()  # the worker has left or was killed: its writes fail, it ends
                else:
                    out, err, timed_out = _communicate(self.proc, json.dumps(request), timeout)
            except BrokenPipeError:  # it died before reading the request
                out, err, timed_out = "", "", False
                self.proc.wait()
            if timed_out:
                return {"ok": False, "error": f"the engine did not finish within {timeout:.0f} s", "timed_out": True}
            if result.exists():
                answer = json.loads(result.read_text())
                answer["exit_code"] = self.proc.returncode
                return answer
            tail = Result([], self.proc.returncode, out, err or "").tail()
            return {"ok": False, "error": f"the engine exited with {self.proc.returncode} before answering: {tail}",
                    "exit_code": self.proc.returncode, "unanswered": True}

    def discard(self, *, wait: bool = True) -> None:
        """Not needed after all: end it (its stdin closed; killed if it does not leave at once, or when it was sent
        work).  wait=False: only close its stdin — it leaves by itself once its start-up is done, and this process
        does not wait for that."""
        if self.proc.poll() is not None or self.sent:  # gone already; or sent work (``send``) for a request that
            if self.proc.poll() is None:  # will not come: stopped now, not once done
                _kill_group(self.proc)
                self.proc.wait()
            if self._fed():
                self.proc.stdin = None
                self._feeder.join()  # its writes fail now: it ends
        else:
            try:
                self.proc.stdin.close()
                if not wait:
                    return
                self.proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                _kill_group(self.proc)
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:  # stdin of a killed worker, with nothing left to flush: nothing to do
                pass


def worker(module: str, request: dict, *, timeout: float, show_progress: bool = False) -> dict:
    """Run ``lorastrap.<module>`` with a JSON request; return the JSON answer it wrote to its result file (see
    Worker.ask)."""
    return Worker(module, show_progress=show_progress).ask(request, timeout=timeout)


def become(argv: list[str], *, extra_env: dict[str, str] | None = None) -> None:
    """Replace this process with ARGV (exec): it keeps the pid, the terminal, stdin/stdout and every signal sent
    to lorastrap, and its exit code is the one the caller sees.  Never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **(extra_env or {})})
