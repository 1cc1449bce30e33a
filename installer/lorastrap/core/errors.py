"""What / why / fix: the one shape of everything lorastrap tells a user, the one renderer, and the exit codes.

``LorastrapError`` is a failure (the CLI prints it and exits with its code; a traceback only with ``--debug``);
``Finding`` is an observation of detect or doctor (with a severity instead of an exit code).  Both are printed by
``render``.  The codes are shared with ``setup.sh``.
"""

from __future__ import annotations

from typing import Literal

from lorastrap.core.plain import Plain, record

# Exit codes: documented in README.md ("Exit codes") and used by setup.sh.
OK = 0
INTERNAL = 1  # a bug in lorastrap: please report it
USAGE = 2  # bad command-line flags or arguments
NO_PROFILE = 3  # no environment profile fits this machine
CONFIG = 4  # malformed profiles.yaml, spec, lock or fixture
NETWORK = 5  # a channel or mirror could not be reached
INTEGRITY = 6  # a package's checksum does not match its lock
DISK = 7  # not enough free disk
BUSY = 8  # another lorastrap holds the lock (with --no-wait)
VERIFY = 9  # the verification run failed
PREREQ = 10  # setup.sh: a prerequisite is missing (python3 >= 3.10 with venv, curl or wget, micromamba)
DOCTOR_REPAIRABLE = 11  # doctor: problems that `repair` fixes from the environment's own lock
DOCTOR_UNREPAIRABLE = 12  # doctor: the environment no longer fits the machine (`repair --replan`)
FLEET_INCOMPLETE = 13  # fleet: a node failed or was never started (fleet.json says which and why)
NO_ENV = 14  # run, shell, update, rollback, uninstall: no such environment (or no previous generation)
CMD_NOT_FOUND = 127  # run: the command is neither in the environment nor on PATH (as shells say it)
EXPLAIN_UNKNOWN = 15  # explain: the error is not in the table of known failures (doctor's findings follow)
NOT_WRITABLE = 16  # a folder lorastrap must write to is read-only or not permitted
NOT_OURS = 17  # the target is not lorastrap's (another tool's environment, the user's folder): --force to replace it
UNSAFE_PACKAGE = 18  # a package would write outside its environment (a path with .., an absolute path, through a link)
NO_LOCK = 19  # install --frozen: this lorastrap has no committed lock for the profile and platform
INTERRUPTED = 130  # Ctrl-C / SIGTERM

EXIT_CODES = {
    OK: "success",
    INTERNAL: "internal error (a bug: please report it with --debug output)",
    USAGE: "usage error",
    NO_PROFILE: "no environment profile fits this machine",
    CONFIG: "malformed configuration (profiles, spec or lock file)",
    NETWORK: "a channel or mirror could not be reached",
    INTEGRITY: "a package does not match the checksum in its lock",
    DISK: "not enough free disk space",
    BUSY: "another lorastrap run holds the lock",
    VERIFY: "the verification run failed",
    PREREQ: "setup.sh: a prerequisite is missing (python3 >= 3.10 with venv, curl/wget, or micromamba)",
    DOCTOR_REPAIRABLE: "doctor: the environment is broken and `repair` can fix it",
    DOCTOR_UNREPAIRABLE: "doctor: the environment no longer fits this machine (`repair --replan`)",
    FLEET_INCOMPLETE: "fleet: a node failed or was never started (fleet.json says which and why)",
    NO_ENV: "no such environment, or no previous generation to roll back to (`lorastrap list`)",
    CMD_NOT_FOUND: "run: the command was not found in the environment or on PATH",
    EXPLAIN_UNKNOWN: "explain: the error is not in the table of known failures",
    NOT_WRITABLE: "a folder lorastrap must write to is read-only (or not permitted)",
    NOT_OURS: "the target was not made by lorastrap; it replaces or deletes only what it made (or --force)",
    UNSAFE_PACKAGE: "a package would write outside its environment; nothing was installed",
    NO_LOCK: "--frozen: no committed lock for this profile and platform (drop --frozen to lock on first use)",
    INTERRUPTED: "interrupted",
}


class LorastrapError(Exception):
    """A failure explained to the user: what happened, why, and how to fix it."""

    exit_code = INTERNAL

    def __init__(self, what: str, *, why: str = "", fix: str = "", exit_code: int | None = None):
        super().__init__(what)
        self.what = what
        self.why = why
        self.fix = fix
        self.context: dict = {}  # more facts for the JSON form (e.g. the machine it failed on), set by the caller
        if exit_code is not None:
            self.exit_code = exit_code

    def to_dict(self) -> dict:
        from lorastrap.core.invocation import runnable
        return {**self.context, "error": type(self).__name__, "what": self.what, "why": self.why,
                "fix": runnable(self.fix),
                "exit_code": self.exit_code}

    def render(self) -> str:
        return render("error:", self.what, self.why, self.fix)


def render(label: str, what: str, why: str = "", fix: str = "", indent: str = "  ") -> str:
    """``label what`` and, when given, the why and fix lines under it."""
    lines = [f"{label} {what}"]
    if why:
        lines.append(f"{indent}why: {why}")
    if fix:
        from lorastrap.core.invocation import runnable  # the command as the user runs it, with their --prefix
        lines.append(f"{indent}fix: {runnable(fix)}")
    return "\n".join(lines)


@record
class Finding(Plain):
    """An observation about the machine (detect) or an environment (doctor): what, why, fix, how serious.

    ``repair`` (doctor only) says what fixes it: a rebuild from the environment's own lock, a rebuild with the
    profile planned now, or nothing lorastrap does."""

    severity: Literal["info", "warning", "error"]
    code: str
    what: str
    why: str = ""
    fix: str = ""
    repair: Literal["rebuild", "replan", "none"] | None = None

    def render(self) -> str:
        return render(f"[{self.severity}]", self.what, self.why, self.fix, indent="    ")


# One subclass per exit code, so callers can catch a kind of failure.
class UsageError(LorastrapError): exit_code = USAGE  # noqa: E701
class NoProfileError(LorastrapError): exit_code = NO_PROFILE  # noqa: E701
class ConfigError(LorastrapError): exit_code = CONFIG  # noqa: E701
class NetworkError(LorastrapError): exit_code = NETWORK  # noqa: E701
class IntegrityError(LorastrapError): exit_code = INTEGRITY  # noqa: E701
class DiskError(LorastrapError): exit_code = DISK  # noqa: E701
class BusyError(LorastrapError): exit_code = BUSY  # noqa: E701
class VerifyError(LorastrapError): exit_code = VERIFY  # noqa: E701
class NoEnvError(LorastrapError): exit_code = NO_ENV  # noqa: E701
class Interrupted(LorastrapError): exit_code = INTERRUPTED  # noqa: E701
class NotWritableError(LorastrapError): exit_code = NOT_WRITABLE  # noqa: E701
class NotOursError(LorastrapError): exit_code = NOT_OURS  # noqa: E701
class UnsafePackageError(LorastrapError): exit_code = UNSAFE_PACKAGE  # noqa: E701
class NoLockError(LorastrapError): exit_code = NO_LOCK  # noqa: E701
