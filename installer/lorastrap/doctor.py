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

repair (see repair()) rebuilds through the install transaction; doctor itself changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

from lorastrap import install as inst, lock as locking, locks, paths, plan as planner, prefix as pfx, profiles, subproc, txn, verify
from lorastrap.cache import sha256_file
from lorastrap.detect import Machine
from lorastrap.errors import DOCTOR_REPAIRABLE, DOCTOR_UNREPAIRABLE, OK, Finding as _Finding, UsageError
from lorastrap.records import EnvRecord


def Finding(severity: str, code: str, what: str, why: str = "", fix: str = "", repair: str = "rebuild") -> _Finding:
    """A doctor finding: by default one that a rebuild from the environment's own lock fixes."""
    return _Finding(severity=severity, code=code, what=what, why=why, fix=fix, repair=repair)


@dataclass
class Diagnosis:
    prefix: str
    profile: str | None
    lock: str | None
    findings: list[_Finding] = field(default_factory=list)
    unowned_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        serious = [f for f in self.findings if f.severity != "info"]
        if not serious:
            return "healthy"
        if any(f.repair == "replan" for f in serious):
            return "not-repairable"
        return "repairable"

    @property
    def exit_code(self) -> int:
        return {"healthy": OK, "repairable": DOCTOR_REPAIRABLE, "not-repairable": DOCTOR_UNREPAIRABLE}[self.verdict]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["findings"] = [f.model_dump() for f in self.findings]
        d.update(schema_version=1, verdict=self.verdict, exit_code=self.exit_code)
        return d



def _mapping() -> dict[str, str]:
    """PyPI distribution name → conda package name (envs/pypi-to-conda.json)."""
    raw = json.loads((paths.ENVS / "pypi-to-conda.json").read_text())
    return {canonicalize_name(k): v["conda_name"] for k, v in raw.items()}


# --------------------------------------------------------------------------------------------------------------

def check_files(prefix: Path, diag: Diagnosis) -> tuple[dict[str, pfx.CondaRecord], set[str]]:
    """conda-meta records vs files.  Returns the readable records and the set of paths they own."""
    meta = pfx.conda_meta(prefix)
    for file, why in meta.broken.items():
        diag.findings.append(Finding("error", "broken-record", f"conda-meta/{file} cannot be read", why=why,
                                     fix="`lorastrap repair` rebuilds the environment from its lock."))
    owned: set[str] = set()
    for name, rec in meta.records.items():
        missing, altered = [], []
        for entry in rec.paths:
            rel = entry["_path"]
            owned.add(rel)
            path = prefix / rel
            if not os.path.lexists(path):
                missing.append(rel)
                continue
            if entry.get("path_type", "hardlink") == "softlink" or path.is_symlink():
                continue
            want = entry.get("sha256_in_prefix") or entry.get("sha256")
            if want and sha256_file(path) != want:
                altered.append(rel)
        if missing:
            diag.findings.append(Finding(
                "error", "missing-files", f"{name}: {len(missing)} file(s) missing, e.g. {missing[0]}",
                why="files were deleted after the package was installed",
                fix="`lorastrap repair` reinstalls the package."))
        if altered:
            diag.findings.append(Finding(
                "error", "altered-files", f"{name}: {len(altered)} file(s) changed, e.g. {altered[0]}",
                why="the file's sha256 differs from what the package installed (edited, or overwritten by pip)",
                fix="`lorastrap repair` restores the package's files (the edited ones stay in the backup)."))
    return meta.records, owned


def check_lock(lk: locking.Lock | None, platform: str, records: dict[str, pfx.CondaRecord], diag: Diagnosis) -> None:
    if lk is None:
        diag.findings.append(Finding("info", "no-lock", "no lock to compare this environment against",
                                     why="it was not made by lorastrap and no committed lock fits this platform",
                                     fix="`lorastrap repair --replan` rebuilds it from the profile plan "
                                         "chooses.", repair="none"))
        return
    want = {e.name: e for e in lk.for_platform(platform) if e.manager == "conda"}
    for name, e in sorted(want.items()):
        rec = records.get(name)
        if rec is None:
            diag.findings.append(Finding("error", "package-missing", f"{name} {e.version} is in the lock but not "
                                         "installed", why="removed by hand, or a conda-meta record was deleted",
                                         fix="`lorastrap repair` reinstalls it."))
        elif rec.sha256 != e.sha256 or rec.version != e.version:
            diag.findings.append(Finding("error", "package-changed", f"{name}: installed {rec.version} "
                                         f"({rec.build}), the lock has {e.version} ({e.build})",
                                         why="updated or replaced after the environment was built",
                                         fix="`lorastrap repair` puts back the locked build."))
    for name in sorted(set(records) - set(want)):
        diag.findings.append(Finding("warning", "package-extra", f"{name} {records[name].version} is "
                                     "installed but not in the lock", why="added after the environment was built",
                                     fix="`lorastrap repair` rebuilds without it (or add it to the spec "
                                         "and re-lock)."))


PIP_INSTALLERS = ("pip", "uv")  # what writes INSTALLER for a wheel installed over conda (lorastrap's own pip step: uv)


def check_pip(prefix: Path, lk: locking.Lock | None, platform: str, records: dict[str, pfx.CondaRecord],
              diag: Diagnosis) -> set[str]:
    """pip on top of conda.  Returns the paths the pip-installed distributions own."""
    locked = {canonicalize_name(e.name): e.version for e in (lk.for_platform(platform) if lk else [])
              if e.manager == "pip"}
    mapping = _mapping()
    conda_names = {canonicalize_name(n): n for n in records}
    owned: set[str] = set()
    pip_dists = [d for d in pfx.distributions(prefix).values() if d.installer in PIP_INSTALLERS]
    for dist in sorted(pip_dists, key=lambda d: d.name):
        owned.update(dist.files)
        if locked.get(dist.name) == dist.version:
            continue  # a pip entry of the lock
        conda_name = conda_names.get(canonicalize_name(mapping.get(dist.name, dist.name)))
        if conda_name:
            diag.findings.append(Finding(
                "error", "pip-shadows-conda", f"pip installed {dist.name} {dist.version} over the conda package "
                f"{conda_name} {records[conda_name].version}",
                why="a `pip install` into this conda environment replaced a locked package's files (the classic "
                    "`pip install -U bitsandbytes` over a conda environment)",
                fix="`lorastrap repair` removes it and restores the locked package; to change a version, "
                    "edit the profile's spec and re-lock instead."))
        else:
            diag.findings.append(Finding("warning", "pip-extra", f"pip installed {dist.name} {dist.version}, which "
                                         "the lock does not have", why="added with pip after the environment was built",
                                         fix="Add it to the spec's pip: section and re-lock, or remove it."))
    python = pfx.python_of(prefix)
    if python and pip_dists:
        res = subproc.run([sys.executable, "-m", "pip", "--python", str(python), "check", "--isolated",
                           "--disable-pip-version-check"], timeout=120)
        if res.returncode not in (0, None) and res.stdout.strip():
            first = res.stdout.strip().splitlines()
            diag.findings.append(Finding("warning", "pip-check", f"pip check: {first[0]}"
                                         + (f" (+{len(first) - 1} more)" if len(first) > 1 else ""),
                                         why="installed distributions' requirements are not met",
                                         fix="`lorastrap repair`, or fix the spec and re-lock."))
    return owned


def check_machine(profile_name: str | None, record: EnvRecord | None, matrix: profiles.Matrix | None,
                  machine: Machine, diag: Diagnosis) -> None:
    if record and machine.platform and record.platform != machine.platform:
        diag.findings.append(Finding("error", "platform-changed", f"built for {record.platform}, this machine "
                                     f"is {machine.platform}", why="the environment was copied to another kind of "
                                     "machine", fix="`lorastrap repair --replan`", repair="replan"))
    if not profile_name or matrix is None or profile_name not in matrix.profiles:
        return
    for c in planner.check(matrix.profiles[profile_name], machine):
        if not c.ok and c.rule != "platform":
            diag.findings.append(Finding(
                "error", f"machine-{c.rule}", f"profile {profile_name} no longer fits this machine: {c.message}",
                why="the machine moved under the environment (driver changed, GPU changed, moved to another node); "
                    f"rule source: {c.source}",
                fix="`lorastrap repair --replan` rebuilds with the profile that fits now "
                    "(`lorastrap plan` shows it), or upgrade the driver.", repair="replan"))


def check_imports(prefix: Path, matrix: profiles.Matrix, machine: Machine, diag: Diagnosis) -> None:
    if pfx.python_of(prefix) is None:
        diag.findings.append(Finding("error", "no-python", "the environment has no bin/python",
                                     fix="`lorastrap repair`"))
        return
    report, res = verify.run(prefix, matrix=matrix, driver_cuda=machine.cuda, pre_checks_only=True,
                             timeout=verify.PRE_CHECKS_TIMEOUT_S)
    if report is None:
        diag.findings.append(Finding("error", "python-broken", "the environment's Python could not run the "
                                     "pre-checks", why=res.tail(5), fix="`lorastrap repair`"))
        return
    for c in report.get("checks", []):
        if c["status"] == "fail" or (c["status"] == "warn" and not c["required"] and "cause" in c):
            diag.findings.append(Finding(
                "error" if c["status"] == "fail" else "warning", "precheck",
                f"{c['name']}: {c['detail']}" + (f" — users see: {c['error']}" if c.get("error") else ""),
                why=c.get("cause", ""), fix=c.get("fix", ""), repair="rebuild"))
    if report.get("verdict") == "unsupported":
        # With broken files or packages, that may be the breakage talking: rebuild first, then look again.
        intact = not any(f.severity == "error" and f.code != "precheck" for f in diag.findings)
        diag.findings.append(Finding("error", "precheck-unsupported", report.get("unsupported_reason") or "",
                                     why="this environment's set cannot do 8-bit on this machine",
                                     fix="`lorastrap repair --replan`" if intact else
                                     "`lorastrap repair` first (the environment is damaged), then doctor again",
                                     repair="replan" if intact else "rebuild"))


def unowned(prefix: Path, owned: set[str]) -> list[str]:
    """Files in the prefix no package (conda or pip) owns: the user's, carried over by repair."""
    out = []
    for root, dirs, files in os.walk(prefix):
        rel_root = os.path.relpath(root, prefix)
        if rel_root == "conda-meta" or rel_root.startswith("conda-meta" + os.sep):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            rel = os.path.normpath(os.path.join(rel_root, f))
            if rel in owned or f.endswith(".pyc") or rel == "CACHEDIR.TAG":
                continue
            out.append(rel)
    return sorted(out)


# --------------------------------------------------------------------------------------------------------------

def the_lock(prefix: Path, envs_dir: Path, matrix: profiles.Matrix,
             machine: Machine) -> tuple[locking.Lock | None, str | None, EnvRecord | None]:
    """The environment's own lock and profile (kept by install), or for a foreign one the planned profile's."""
    record = pfx.read_record(prefix)
    if record and pfx.own_lock(prefix).exists():
        return locking.read_lock(pfx.own_lock(prefix)), record.profile, record
    chosen = planner.plan(machine, matrix).profile
    if chosen:
        committed = locking.lock_path(envs_dir, chosen)
        if committed.exists():
            lk = locking.read_lock(committed)
            if machine.platform in lk.platforms:
                return lk, chosen, None
    return None, chosen, None


def diagnose(prefix: Path, *, envs_dir: Path, machine: Machine, imports: bool = True) -> Diagnosis:
    start = time.perf_counter()
    prefix = prefix.absolute()
    if not pfx.is_conda_env(prefix):
        raise UsageError(f"{prefix} is not a conda environment (no conda-meta/)",
                         fix="Pass the environment's prefix (--prefix) or name (--name).")
    matrix = profiles.load(envs_dir)
    lk, profile_name, record = the_lock(prefix, envs_dir, matrix, machine)
    diag = Diagnosis(prefix=str(prefix), profile=profile_name, lock=str(lk.path) if lk else None)
    if txn.journal_path(prefix).exists():
        diag.findings.append(Finding("error", "interrupted-transaction", "an install or repair of this "
                                     "environment was interrupted", why=f"{txn.journal_path(prefix)} is still there",
                                     fix="Run `lorastrap repair` (or the same install) again: it finishes "
                                         "the rollback first."))
    platform = (record.platform if record else None) or machine.platform or ""
    records, owned = check_files(prefix, diag)
    check_lock(lk, platform, records, diag)
    owned |= check_pip(prefix, lk, platform, records, diag)
    check_machine(profile_name, record, matrix, machine, diag)
    if imports:
        check_imports(prefix, matrix, machine, diag)
    diag.unowned_files = unowned(prefix, owned | {str(pfx.RECORD_DIR / "record.json")})
    if diag.unowned_files:
        diag.findings.append(Finding("info", "user-files", f"{len(diag.unowned_files)} file(s) no package owns, "
                                     f"e.g. {diag.unowned_files[0]}", why="your own files inside the environment",
                                     fix="repair carries them over and keeps them in the backup.", repair="none"))
    diag.seconds = round(time.perf_counter() - start, 3)
    return diag


def format_diagnosis(diag: Diagnosis) -> str:
    lines = [f"{diag.prefix}: profile {diag.profile or '?'}, lock {diag.lock or 'none'}"]
    lines += [f.render() for f in diag.findings]
    lines.append({"healthy": "verdict: healthy",
                  "repairable": "verdict: repairable — `lorastrap repair` rebuilds it from its lock",
                  "not-repairable": "verdict: not repairable as locked — `lorastrap repair --replan` "
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
    with locks.held(txn.lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate):
        done = txn.recover(prefix, narrate)  # an interrupted run first
        if done:
            narrate(done)
        diag = diagnose(prefix, envs_dir=envs_dir, machine=machine, imports=False)
        matrix = profiles.load(envs_dir)
        record = pfx.read_record(prefix)
        tmp = Path(tempfile.mkdtemp(prefix="lorastrap-repair-"))
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
            for line in plan_text:
                narrate(f"repair will: {line}")
            if not yes and confirm is not None and not confirm():
                raise UsageError("repair cancelled", fix="Run again and answer y, or pass --yes.")
            result = inst.install_locked(prefix=prefix, envs_dir=envs_dir, name=name, profile=matrix.profiles[name],
                                         matrix=matrix, platform=machine.platform or (record.platform if record else ""),
                                         lock_file=lock_file, force=True, keep_backup=keep_backup,
                                         carry_over=tuple(diag.unowned_files), driver_cuda=machine.cuda,
                                         narrate=narrate, **install_args)
            return diag, result
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
