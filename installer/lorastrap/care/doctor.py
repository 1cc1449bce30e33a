"""Step 6: diagnose an environment (made by lorastrap or not) and say what is wrong, why, and how to fix it.

Findings come from five places:
  files     conda-meta against the files on disk: missing, altered (sha256, as `conda doctor` does), broken records
  lock      conda-meta against the lock the environment was built from (or, for a foreign environment, the lock of
            the profile `plan` chooses now): packages missing, at another version/build, or extra
  pip       distributions pip put on top of conda (INSTALLER says pip) that shadow a conda package, and `pip check`
  machine   the machine moved under the environment: platform, the driver's CUDA, compute capability — judged by
            the profile's own rules in envs/profiles.yaml
  imports   the verification pre-checks (scripts/verify_lora.py --pre-checks-only): imports and version gates,
            with the error each would produce

Any other Python environment (a venv or virtualenv, or an interpreter given by path) gets the imports and `pip check`
findings, with fixes that change that environment or let lorastrap build a locked one (diagnose_python).

repair (see repair()) rebuilds through the install transaction; doctor itself changes nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, field
from pathlib import Path

from packaging.utils import canonicalize_name

from lorastrap.install import generations
from lorastrap.install import transaction as inst, prefix as pfx, txn, verify
from lorastrap.locking import lockfile, names, spec
from lorastrap.core import fsutil, locks, subproc
from lorastrap.matrix import plan as planner, profiles
from lorastrap.install.cache import sha256_file
from lorastrap.machine.model import Machine
from lorastrap.core.errors import BUSY, DOCTOR_REPAIRABLE, DOCTOR_UNREPAIRABLE, OK, Finding, UsageError
from lorastrap.core.records import EnvRecord
from lorastrap.core.plain import Struct, struct


def finding(severity: str, code: str, what: str, why: str = "", fix: str = "", repair: str = "rebuild") -> Finding:
    """A doctor finding: by default one that a rebuild from the environment's own lock fixes."""
    return Finding(severity=severity, code=code, what=what, why=why, fix=fix, repair=repair)


@struct
class Diagnosis(Struct):
    prefix: str
    profile: str | None
    lock: str | None
    findings: list[Finding] = field(default_factory=list)
    unowned_files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kind: str = "conda"  # conda, venv (a venv or virtualenv), python (an interpreter given by path)
    python: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)  # the stack, as the pre-checks imported it
    report: dict | None = field(default=None, repr=False)  # the pre-checks' report (explain judges by it)

    @property
    def verdict(self) -> str:
        if any(f.code == "transaction-running" for f in self.findings):
            return "busy"
        serious = [f for f in self.findings if f.severity != "info"]
        if not serious:
            return "healthy"
        if any(f.repair == "replan" for f in serious):
            return "not-repairable"
        return "repairable"

    @property
    def exit_code(self) -> int:
        return {"healthy": OK, "repairable": DOCTOR_REPAIRABLE, "not-repairable": DOCTOR_UNREPAIRABLE,
                "busy": BUSY}[self.verdict]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("report")
        d["findings"] = [f.model_dump() for f in self.findings]
        d.update(schema_version=1, verdict=self.verdict, exit_code=self.exit_code)
        return d



# --------------------------------------------------------------------------------------------------------------

FILE_FINDINGS = {  # code: (what, after the package and the count; why; fix)
    "missing-files": ("file(s) missing", "files were deleted after the package was installed",
                      "`lorastrap repair` reinstalls the package."),
    "replaced-files": ("file(s) replaced by a link, folder or something unreadable",
                       "the package installed a regular file there",
                       "`lorastrap repair` puts the package's files back (what stood there is kept in the backup)."),
    "cache-shares-edit": ("changed file(s) are hard links shared with the package cache (or other environments)",
                          "environments are hard-linked to the cache's extracted packages (conda's default), so an "
                          "edit in place changed the cache's copy too",
                          "`lorastrap repair` checks the cache against the packages and unpacks damaged ones again; "
                          "install with `--link-mode copy` for environments whose files you edit."),
    "altered-files": ("file(s) changed",
                      "the file's sha256 differs from what the package installed (edited, or overwritten by pip)",
                      "`lorastrap repair` restores the package's files (the edited ones stay in the backup)."),
}


def check_files(prefix: Path, diag: Diagnosis) -> tuple[dict[str, pfx.CondaRecord], set[str]]:
    """conda-meta records vs files.  Returns the readable records and the set of paths they own."""
    meta = pfx.conda_meta(prefix)
    for file, why in meta.broken.items():
        diag.findings.append(finding("error", "broken-record", f"conda-meta/{file} cannot be read", why=why,
                                     fix="`lorastrap repair` rebuilds the environment from its lock."))
    owned: set[str] = set()
    for name, rec in meta.records.items():
        missing, altered, replaced = [], [], []
        for entry in rec.paths:
            rel = entry["_path"]
            owned.add(rel)
            path = prefix / rel
            if not os.path.lexists(path):
                missing.append(rel)
                continue
            kind = entry.get("path_type", "hardlink")
            if kind == "softlink":
                continue
            if kind == "directory":
                if not path.is_dir():
                    replaced.append(rel)
                continue
            if path.is_symlink() or not path.is_file():  # a file the package put there is now a link or a folder
                replaced.append(rel)
                continue
            want = entry.get("sha256_in_prefix") or entry.get("sha256")
            try:
                if want and sha256_file(path) != want:
                    altered.append(rel)
            except OSError:
                replaced.append(rel)
        shared = [rel for rel in altered if (prefix / rel).stat().st_nlink > 1]
        for code, found in (("missing-files", missing), ("replaced-files", replaced), ("cache-shares-edit", shared),
                            ("altered-files", altered)):
            if found:
                what, why, fix = FILE_FINDINGS[code]
                diag.findings.append(finding("error", code, f"{name}: {len(found)} {what}, e.g. {found[0]}",
                                             why=why, fix=fix))
    return meta.records, owned


def check_lock(lk: lockfile.Lock | None, platform: str, records: dict[str, pfx.CondaRecord], diag: Diagnosis) -> None:
    if lk is None:
        diag.findings.append(finding("info", "no-lock", "no lock to compare this environment against",
                                     why="it was not made by lorastrap and no committed lock fits this platform",
                                     fix="`lorastrap repair --replan` rebuilds it from the profile plan "
                                         "chooses.", repair="none"))
        return
    unmet = lockfile.missing_dependencies(lk.for_platform(platform))
    if unmet:
        diag.findings.append(finding("error", "lock-incomplete", f"the lock lacks {len(unmet)} dependenc"
                                     f"{'y' if len(unmet) == 1 else 'ies'} of its packages, e.g. {unmet[0]}",
                                     why="a package is installed without what it needs (the lock was cut by hand, "
                                         "or made by a tool that dropped a package)",
                                     fix="`lorastrap repair --replan` rebuilds from a fresh lock of the profile.",
                                     repair="replan"))
    want = {e.name: e for e in lk.for_platform(platform) if e.manager == "conda"}
    for name, e in sorted(want.items()):
        rec = records.get(name)
        if rec is None:
            diag.findings.append(finding("error", "package-missing", f"{name} {e.version} is in the lock but not "
                                         "installed", why="removed by hand, or a conda-meta record was deleted",
                                         fix="`lorastrap repair` reinstalls it."))
        elif rec.sha256 != e.sha256 or rec.version != e.version:
            diag.findings.append(finding("error", "package-changed", f"{name}: installed {rec.version} "
                                         f"({rec.build}), the lock has {e.version} ({e.build})",
                                         why="updated or replaced after the environment was built",
                                         fix="`lorastrap repair` puts back the locked build."))
    for name in sorted(set(records) - set(want)):
        diag.findings.append(finding("warning", "package-extra", f"{name} {records[name].version} is "
                                     "installed but not in the lock", why="added after the environment was built",
                                     fix="`lorastrap repair` rebuilds without it (or add it to the spec "
                                         "and re-lock)."))


PIP_INSTALLERS = ("pip", "uv")  # what writes INSTALLER for a wheel installed over conda (lorastrap's own pip step: uv)


def check_pip(prefix: Path, lk: lockfile.Lock | None, platform: str, records: dict[str, pfx.CondaRecord],
              diag: Diagnosis, envs_dir: Path | None = None) -> set[str]:
    """pip on top of conda.  Returns the paths the pip-installed distributions own."""
    locked = {canonicalize_name(e.name): e.version for e in (lk.for_platform(platform) if lk else [])
              if e.manager == "pip"}
    mapping = names.load(envs_dir)
    conda_names = {canonicalize_name(n): n for n in records}
    owned: set[str] = set()
    pip_dists = [d for d in pfx.distributions(prefix).values() if d.installer in PIP_INSTALLERS]
    for dist in sorted(pip_dists, key=lambda d: d.name):
        owned.update(dist.files)
        if locked.get(dist.name) == dist.version:
            continue  # a pip entry of the lock
        conda_name = conda_names.get(canonicalize_name(mapping.conda(dist.name)))
        if conda_name:
            diag.findings.append(finding(
                "error", "pip-shadows-conda", f"pip installed {dist.name} {dist.version} over the conda package "
                f"{conda_name} {records[conda_name].version}",
                why="a `pip install` into this conda environment replaced a locked package's files (the classic "
                    "`pip install -U bitsandbytes` over a conda environment)",
                fix="`lorastrap repair` removes it and restores the locked package; to change a version, "
                    "edit the profile's spec and re-lock instead."))
        else:
            diag.findings.append(finding("warning", "pip-extra", f"pip installed {dist.name} {dist.version}, which "
                                         "the lock does not have", why="added with pip after the environment was built",
                                         fix="Add it to the spec's pip: section and re-lock, or remove it."))
    python = pfx.python_of(prefix)
    if python and pip_dists:
        pip_check(python, diag, fix="`lorastrap repair`, or fix the spec and re-lock.")
    return owned


def pip_check(python: Path, diag: Diagnosis, *, fix: str) -> None:
    """`pip check` of PYTHON's environment (run by lorastrap's own pip: the environment needs none)."""
    res = subproc.run([sys.executable, "-m", "pip", "--python", str(python), "check", "--isolated",
                       "--disable-pip-version-check"], timeout=120)
    if res.returncode not in (0, None) and res.stdout.strip():
        first = res.stdout.strip().splitlines()
        diag.findings.append(finding("warning", "pip-check", f"pip check: {first[0]}"
                                     + (f" (+{len(first) - 1} more)" if len(first) > 1 else ""),
                                     why="installed distributions' requirements are not met", fix=fix))


def check_machine(profile_name: str | None, record: EnvRecord | None, matrix: profiles.Matrix | None,
                  machine: Machine, diag: Diagnosis) -> None:
    if record and machine.platform and record.platform != machine.platform:
        diag.findings.append(finding("error", "platform-changed", f"built for {record.platform}, this machine "
                                     f"is {machine.platform}", why="the environment was copied to another kind of "
                                     "machine", fix="`lorastrap repair --replan`", repair="replan"))
    if not profile_name or matrix is None or profile_name not in matrix.profiles:
        return
    for c in planner.check(matrix.profiles[profile_name], machine):
        if not c.ok and c.rule != "platform":
            diag.findings.append(finding(
                "error", f"machine-{c.rule}", f"profile {profile_name} no longer fits this machine: {c.message}",
                why="the machine moved under the environment (driver changed, GPU changed, moved to another node); "
                    f"rule source: {c.source}",
                fix="`lorastrap repair --replan` rebuilds with the profile that fits now "
                    "(`lorastrap plan` shows it), or upgrade the driver.", repair="replan"))


def check_imports(prefix: Path, matrix: profiles.Matrix, machine: Machine, diag: Diagnosis,
                  python: Path | None = None) -> None:
    if (python or pfx.python_of(prefix)) is None:
        diag.findings.append(finding("error", "no-python", "the environment has no bin/python",
                                     fix="`lorastrap repair`"))
        return
    report, res = verify.run(prefix, matrix=matrix, driver_cuda=machine.cuda, pre_checks_only=True,
                             timeout=verify.PRE_CHECKS_TIMEOUT_S, python=python)
    diag.report = report
    diag.versions = dict((report or {}).get("versions") or {})
    if report is None:
        diag.findings.append(finding("error", "python-broken", "the environment's Python could not run the "
                                     "pre-checks", why=res.tail(5), fix="`lorastrap repair`"))
        return
    for c in report.get("checks", []):
        if c["status"] == "fail" or (c["status"] == "warn" and not c["required"] and "cause" in c):
            diag.findings.append(finding(
                "error" if c["status"] == "fail" else "warning", "precheck",
                f"{c['name']}: {c['detail']}" + (f" — users see: {c['error']}" if c.get("error") else ""),
                why=c.get("cause", ""), fix=c.get("fix", ""), repair="rebuild"))
    if report.get("verdict") == "unsupported":
        # With broken files or packages, that may be the breakage talking: rebuild first, then look again.
        intact = not any(f.severity == "error" and f.code != "precheck" for f in diag.findings)
        diag.findings.append(finding("error", "precheck-unsupported", report.get("unsupported_reason") or "",
                                     why="this environment's set cannot do 8-bit on this machine",
                                     fix="`lorastrap repair --replan`" if intact else
                                     "`lorastrap repair` first (the environment is damaged), then doctor again",
                                     repair="replan" if intact else "rebuild"))


# --------------------------------------------------------------------------------------------------------------

def the_lock(prefix: Path, envs_dir: Path, matrix: profiles.Matrix,
             machine: Machine) -> tuple[lockfile.Lock | None, str | None, EnvRecord | None]:
    """The environment's own lock and profile (kept by install), or for a foreign one the planned profile's."""
    record = pfx.read_record(prefix)
    if record and pfx.own_lock(prefix).exists():
        return lockfile.read_lock(pfx.own_lock(prefix)), record.profile, record
    chosen = planner.plan(machine, matrix).profile
    if chosen:
        committed = spec.lock_path(envs_dir, chosen)
        if committed.exists():
            lk = lockfile.read_lock(committed)
            if machine.platform in lk.platforms:
                return lk, chosen, None
    return None, chosen, None


def _interrupted(prefix: Path) -> bool:
    """A run that changes PREFIX died and left its journal: an install/repair's, or a rollback's."""
    return txn.journal_path(prefix).exists() or generations.swap_journal(prefix).exists()


def _in_transaction(prefix: Path, busy: str | None, start: float) -> Diagnosis:
    """PREFIX mid-change: a run holds its lock now (busy), or one died and left its journal (and maybe the
    environment aside in the backup).  Said as such; nothing of it is judged as a broken environment."""
    diag = Diagnosis(prefix=str(prefix), profile=None, lock=None)
    backup = txn.backup_path(prefix)
    where = (f"; the previous environment is at {backup} until then" if pfx.is_conda_env(backup) else "")
    if busy is not None:
        diag.findings.append(finding("info", "transaction-running", f"a lorastrap run{busy} is changing {prefix} now"
                                     + where, why=f"it holds {txn.lock_file_path(prefix)}",
                                     fix="Run doctor again when it has finished.", repair="none"))
    else:
        journal = txn.journal_path(prefix) if txn.journal_path(prefix).exists() else generations.swap_journal(prefix)
        diag.findings.append(finding("error", "interrupted-transaction", f"an install, repair or rollback of {prefix} "
                                     "was interrupted" + where, why=f"{journal} is still there",
                                     fix="Run `lorastrap repair` (or the same install) again: it finishes the "
                                         "rollback (or the commit) first, with your files."))
    diag.seconds = round(time.perf_counter() - start, 3)
    return diag


def diagnose(prefix: Path | None, *, envs_dir: Path, machine: Machine, imports: bool = True,
             python: Path | None = None, lock_held: bool = False) -> Diagnosis:
    """Diagnose the conda environment PREFIX, or any other Python environment (a venv at PREFIX, or PYTHON).
    lock_held: the caller holds PREFIX's lock (repair), so no other run can be changing it."""
    start = time.perf_counter()
    if python is None and prefix is not None:
        prefix = prefix.absolute()
        busy = None if lock_held else locks.held_by_another(txn.lock_file_path(prefix))
        if busy is not None or (not pfx.is_conda_env(prefix) and _interrupted(prefix)):
            return _in_transaction(prefix, busy, start)
    if python is not None or prefix is None or not pfx.is_conda_env(prefix):
        return diagnose_python(prefix, python=python, envs_dir=envs_dir, machine=machine, imports=imports)
    matrix = profiles.load(envs_dir)
    lk, profile_name, record = the_lock(prefix, envs_dir, matrix, machine)
    diag = Diagnosis(prefix=str(prefix), profile=profile_name, lock=str(lk.path) if lk else None)
    if txn.journal_path(prefix).exists():
        diag.findings.append(finding("error", "interrupted-transaction", "an install or repair of this "
                                     "environment was interrupted", why=f"{txn.journal_path(prefix)} is still there",
                                     fix="Run `lorastrap repair` (or the same install) again: it finishes "
                                         "the rollback first."))
    platform = (record.platform if record else None) or machine.platform or ""
    records, owned = check_files(prefix, diag)
    check_lock(lk, platform, records, diag)
    owned |= check_pip(prefix, lk, platform, records, diag, envs_dir)
    check_machine(profile_name, record, matrix, machine, diag)
    if imports:
        check_imports(prefix, matrix, machine, diag)
    diag.unowned_files = pfx.unowned(prefix, owned | {str(pfx.RECORD_DIR / "record.json")})
    if diag.unowned_files:
        diag.findings.append(finding("info", "user-files", f"{len(diag.unowned_files)} file(s) no package owns, "
                                     f"e.g. {diag.unowned_files[0]}", why="your own files inside the environment",
                                     fix="repair carries them over and keeps them in the backup.", repair="none"))
    diag.seconds = round(time.perf_counter() - start, 3)
    return diag


LOCKED_HINT = ("let lorastrap build a locked environment that passes verification: `lorastrap install --prefix "
               "NEW_PREFIX` (`lorastrap plan` shows the profile it picks)")


def diagnose_python(prefix: Path | None, *, python: Path | None, envs_dir: Path, machine: Machine,
                    imports: bool = True) -> Diagnosis:
    """Any Python environment lorastrap did not make: a venv or virtualenv at PREFIX, or the interpreter PYTHON.
    The stack's versions, the verification pre-checks and `pip check`; the fixes change that environment (or say
    how to let lorastrap build a locked one), never `lorastrap repair`."""
    start = time.perf_counter()
    if python is None:
        python = pfx.python_of(prefix.absolute()) if prefix else None
        if python is None:
            raise UsageError(f"{prefix} is not a conda environment (no conda-meta/) nor any other Python "
                             "environment (no bin/python)",
                             why="doctor judges an environment by its packages or its interpreter; there is neither",
                             fix="Pass a conda environment or a venv (--prefix, --name), or an interpreter "
                                 "(--python PATH).")
    python = Path(python).absolute()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise UsageError(f"{python} is not an executable Python interpreter",
                         fix="Pass the path of the python your training runs with (`which python` inside it).")
    prefix = (prefix or python.parent.parent).absolute()  # bin/python → the environment's root
    kind = "venv" if (prefix / "pyvenv.cfg").is_file() else "python"
    diag = Diagnosis(prefix=str(prefix), profile=None, lock=None, kind=kind, python=str(python))
    if imports:
        check_imports(prefix, profiles.load(envs_dir), machine, diag, python=python)
    pip_check(python, diag, fix="Install the versions it names with pip in this environment, or " + LOCKED_HINT)
    for f in diag.findings:  # `lorastrap repair` rebuilds conda environments only
        if "lorastrap repair" in f.fix:
            f.fix = _outside_lorastrap(f.fix)
        if f.repair == "rebuild":
            f.repair = "none"
    diag.seconds = round(time.perf_counter() - start, 3)
    return diag


def _outside_lorastrap(fix: str) -> str:
    """A pre-check's fix for an environment lorastrap did not make: no `lorastrap repair` in it."""
    for old in ("`lorastrap repair --replan`", " (`lorastrap repair`)", "`lorastrap repair`, or ",
                "`lorastrap repair`"):
        fix = fix.replace(old, "")
    fix = fix.strip(" ,;.")
    return (fix + "; or " if fix else "") + LOCKED_HINT


def format_diagnosis(diag: Diagnosis) -> str:
    if diag.kind != "conda":
        lines = [f"{diag.prefix}: {'a venv' if diag.kind == 'venv' else 'a Python environment'} "
                 f"(python {diag.python}), not made by lorastrap"]
    else:
        lines = [f"{diag.prefix}: profile {diag.profile or '?'}, lock {diag.lock or 'none'}"]
    if diag.versions:
        lines.append("stack: " + ", ".join(f"{k} {v or '-'}" for k, v in diag.versions.items()))
    lines += [f.render() for f in diag.findings]
    if diag.kind != "conda":
        lines.append({"healthy": "verdict: healthy",
                      "repairable": f"verdict: repairable — apply the fixes above, or {LOCKED_HINT}",
                      "not-repairable": "verdict: not-repairable — this environment cannot do 8-bit on this "
                                        "machine; " + LOCKED_HINT}[diag.verdict])
        return "\n".join(lines)
    lines.append({"busy": "verdict: being changed by another run now — look again when it has finished",
                  "healthy": "verdict: healthy",
                  "repairable": "verdict: repairable — `lorastrap repair` rebuilds it from its lock",
                  "not-repairable": "verdict: not-repairable as locked — `lorastrap repair --replan` "
                                    "rebuilds it with the profile that fits this machine now"}[diag.verdict])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------

def repair(prefix: Path, *, envs_dir: Path, machine: Machine, replan: bool = False, yes: bool = False,
           keep_backup: bool = True, confirm=None, wait: bool = True, narrate=lambda m: None,
           **install_args) -> tuple[Diagnosis, inst.InstallResult]:
    """Rebuild PREFIX through the install transaction: from its own lock, or (replan) from the profile plan
    chooses now.  The old environment becomes the backup (kept unless keep_backup=False) and comes back on any
    failure; files no package owns are carried over.  The prefix lock is held from the diagnosis to the end, so
    no other run changes PREFIX (or its backup) in between."""
    prefix = prefix.absolute()
    if not pfx.is_conda_env(prefix) and not _interrupted(prefix):
        raise UsageError(f"{prefix} is not a conda environment: repair rebuilds conda environments from a lock",
                         why="it has no conda-meta/ folder, so there is no record of its packages to rebuild from",
                         fix=f"Apply the fixes `lorastrap doctor --prefix {prefix}` lists, or {LOCKED_HINT}.")
    with locks.held(txn.lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate), ExitStack() as stack:
        done = generations.recover_all(prefix, narrate)  # an interrupted run first (it may put the environment back)
        if done:
            narrate(done)
        # From here every child (pip check in the diagnosis too) is in the transaction's children record.
        stack.enter_context(subproc.recording_groups(txn.children_path(prefix)))
        if not pfx.is_conda_env(prefix):
            raise UsageError(f"{prefix} is not a conda environment: repair rebuilds conda environments from a lock",
                             why="it has no conda-meta/ folder, so there is no record of its packages to rebuild from",
                             fix=f"Apply the fixes `lorastrap doctor --prefix {prefix}` lists, or {LOCKED_HINT}.")
        diag = diagnose(prefix, envs_dir=envs_dir, machine=machine, imports=False, lock_held=True)
        matrix = profiles.load(envs_dir)
        record = pfx.read_record(prefix)
        fsutil.remove_orphans(Path(tempfile.gettempdir()), "lorastrap-repair-")  # of repairs killed earlier
        tmp = Path(tempfile.mkdtemp(prefix=f"lorastrap-repair-{fsutil.owner_tag()}."))
        try:
            if replan or record is None or not pfx.own_lock(prefix).exists():
                name = planner.require_profile(planner.plan(machine, matrix))
                lock_file = None
                source = f"the profile plan chooses now ({name})"
            else:
                name = record.profile
                if name not in matrix.profiles:
                    raise UsageError(f"{prefix} was built with profile {name!r}, which {envs_dir}/profiles.yaml lacks",
                                     fix="Pass the --envs-dir it was installed with, or use --replan.")
                lock_file = tmp / f"{name}.conda-lock.yml"
                shutil.copyfile(pfx.own_lock(prefix), lock_file)  # PREFIX moves aside during the transaction
                source = f"its own lock (profile {name})"
            plan_text = [f"rebuild {prefix} from {source}",
                         f"keep the current environment as {txn.backup_path(prefix)}"
                         + ("" if keep_backup else " until the new one is verified"),
                         f"carry over {len(diag.unowned_files)} file(s) no package owns"]
            kept = generations.generations(prefix)  # update's (or rollback's): never dropped by a repair
            if kept:
                plan_text[1] = (f"keep the current environment as {txn.backup_path(prefix)} only until the new one is "
                                f"verified, then remove it: the {len(kept)} kept generation(s) stay, and `lorastrap "
                                f"rollback` still returns to {kept[0]}")
            for line in plan_text:
                narrate(f"repair will: {line}")
            if not yes and (confirm is None or not confirm()):  # no way to ask: a script must say --yes
                raise UsageError("repair cancelled" if confirm else "repair needs --yes when it cannot ask",
                                 why="repair replaces the environment (the old one is kept as the backup)",
                                 fix="Run again and answer y, or pass --yes.")
            if kept:
                generations.shift_older(prefix)  # generation 1's place is the repair's own backup meanwhile
            try:
                result = inst.install_locked(
                    prefix=prefix, envs_dir=envs_dir, name=name, profile=matrix.profiles[name], matrix=matrix,
                    platform=machine.platform or (record.platform if record else ""), lock_file=lock_file, force=True,
                    keep_backup=keep_backup and not kept, check_cache=True, carry_over=tuple(diag.unowned_files),
                    driver_cuda=machine.cuda,
                    replace_foreign=True,  # asked (or --yes) above; a foreign one is kept
                    narrate=narrate, **install_args)
            finally:
                if kept:
                    generations.close_gap(prefix)
            return diag, result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
