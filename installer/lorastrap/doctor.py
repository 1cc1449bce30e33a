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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from lorastrap import install as inst, lock as locking, paths, plan as planner, profiles, subproc
from lorastrap.cache import sha256_file
from lorastrap.detect import Machine
from lorastrap.errors import DOCTOR_REPAIRABLE, DOCTOR_UNREPAIRABLE, OK, UsageError

Repair = Literal["rebuild", "replan", "none"]


@dataclass
class Finding:
    severity: Literal["info", "warning", "error"]
    code: str
    what: str
    why: str = ""
    fix: str = ""
    repair: Repair = "rebuild"


@dataclass
class Diagnosis:
    prefix: str
    profile: str | None
    lock: str | None
    findings: list[Finding] = field(default_factory=list)
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
        d.update(schema_version=1, verdict=self.verdict, exit_code=self.exit_code)
        return d



def _mapping() -> dict[str, str]:
    """PyPI distribution name → conda package name (envs/pypi-to-conda.json)."""
    raw = json.loads((paths.ENVS / "pypi-to-conda.json").read_text())
    return {inst._norm(k): v["conda_name"] for k, v in raw.items()}


# --------------------------------------------------------------------------------------------------------------

def check_files(prefix: Path, diag: Diagnosis) -> tuple[dict[str, dict], set[str]]:
    """conda-meta records vs files.  Returns the parsed records and the set of paths they own."""
    records: dict[str, dict] = {}
    owned: set[str] = set()
    for meta in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            rec = json.loads(meta.read_text())
            name = rec["name"]
            entries = rec["paths_data"]["paths"] if "paths_data" in rec else [{"_path": p} for p in rec["files"]]
        except (ValueError, KeyError, TypeError, OSError) as exc:
            diag.findings.append(Finding("error", "broken-record", f"conda-meta/{meta.name} cannot be read",
                                         why=f"{type(exc).__name__}: {exc}",
                                         fix="`lorastrap repair` rebuilds the environment from its lock."))
            continue
        records[name] = rec
        missing, altered = [], []
        for entry in entries:
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
    return records, owned


def check_lock(prefix: Path, lk: locking.Lock | None, platform: str, records: dict[str, dict], diag: Diagnosis) -> None:
    if lk is None:
        diag.findings.append(Finding("info", "no-lock", "no lock to compare this environment against",
                                     why="it was not made by lorastrap and no committed lock fits this platform",
                                     fix="`lorastrap repair --replan` rebuilds it from the profile plan "
                                         "chooses.", repair="none"))
        return
    entries = [e for e in lk.for_platform(platform) if e.manager == "conda"]
    want = {e.name: e for e in entries}
    for name, e in sorted(want.items()):
        rec = records.get(name)
        if rec is None:
            diag.findings.append(Finding("error", "package-missing", f"{name} {e.version} is in the lock but not "
                                         "installed", why="removed by hand, or a conda-meta record was deleted",
                                         fix="`lorastrap repair` reinstalls it."))
        elif rec.get("sha256") != e.sha256 or str(rec.get("version")) != e.version:
            diag.findings.append(Finding("error", "package-changed", f"{name}: installed {rec.get('version')} "
                                         f"({rec.get('build')}), the lock has {e.version} ({e.build})",
                                         why="updated or replaced after the environment was built",
                                         fix="`lorastrap repair` puts back the locked build."))
    for name in sorted(set(records) - set(want)):
        diag.findings.append(Finding("warning", "package-extra", f"{name} {records[name].get('version')} is "
                                     "installed but not in the lock", why="added after the environment was built",
                                     fix="`lorastrap repair` rebuilds without it (or add it to the spec "
                                         "and re-lock)."))


def pip_distributions(prefix: Path) -> list[tuple[str, str, Path]]:
    """(name, version, dist-info) for every distribution pip installed into the environment."""
    sp = inst.site_packages(prefix)
    out = []
    for d in sorted(sp.glob("*.dist-info")) if sp else []:
        try:
            installer = (d / "INSTALLER").read_text().strip()
        except OSError:
            continue
        if installer == "pip":
            name, _, version = d.name[: -len(".dist-info")].partition("-")
            out.append((name, version, d))
    return out


def check_pip(prefix: Path, lk: locking.Lock | None, platform: str, records: dict[str, dict], diag: Diagnosis) -> set[str]:
    """pip on top of conda.  Returns the paths pip's RECORDs own."""
    locked = {inst._norm(e.name): e.version for e in (lk.for_platform(platform) if lk else []) if e.manager == "pip"}
    mapping = _mapping()
    conda_names = {inst._norm(n) for n in records}
    owned: set[str] = set()
    sp = inst.site_packages(prefix)
    dists = pip_distributions(prefix)
    for name, version, dist in dists:
        try:
            for line in (dist / "RECORD").read_text().splitlines():
                rel = line.split(",", 1)[0]
                if rel:
                    owned.add(os.path.relpath(os.path.normpath(sp / rel), prefix))
        except OSError:
            pass
        n = inst._norm(name)
        if locked.get(n) == version:
            continue  # a pip entry of the lock
        conda_name = inst._norm(mapping.get(n, name))
        if conda_name in conda_names:
            diag.findings.append(Finding(
                "error", "pip-shadows-conda", f"pip installed {name} {version} over the conda package "
                f"{mapping.get(n, name)} {records.get(conda_name, records.get(mapping.get(n, name), {})).get('version', '')}".rstrip(),
                why="a `pip install` into this conda environment replaced a locked package's files (the classic "
                    "`pip install -U bitsandbytes` over a conda environment)",
                fix="`lorastrap repair` removes it and restores the locked package; to change a version, "
                    "edit the profile's spec and re-lock instead."))
        else:
            diag.findings.append(Finding("warning", "pip-extra", f"pip installed {name} {version}, which the lock "
                                         "does not have", why="added with pip after the environment was built",
                                         fix="Add it to the spec's pip: section and re-lock, or remove it."))
    python = prefix / "bin" / "python"
    if python.exists() and dists:
        import sys
        res = subproc.run([sys.executable, "-m", "pip", "--python", str(python), "check", "--isolated",
                           "--disable-pip-version-check"], timeout=120)
        if res.returncode not in (0, None) and res.stdout.strip():
            first = res.stdout.strip().splitlines()
            diag.findings.append(Finding("warning", "pip-check", f"pip check: {first[0]}"
                                         + (f" (+{len(first) - 1} more)" if len(first) > 1 else ""),
                                         why="installed distributions' requirements are not met",
                                         fix="`lorastrap repair`, or fix the spec and re-lock."))
    return owned


def check_machine(profile_name: str | None, record: dict | None, matrix: profiles.Matrix | None, machine: Machine,
                  diag: Diagnosis) -> None:
    if record and record.get("platform") and machine.platform and record["platform"] != machine.platform:
        diag.findings.append(Finding("error", "platform-changed", f"built for {record['platform']}, this machine "
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


def check_imports(prefix: Path, machine: Machine, diag: Diagnosis) -> None:
    from lorastrap import verify
    python = prefix / "bin" / "python"
    if not python.exists():
        diag.findings.append(Finding("error", "no-python", "the environment has no bin/python",
                                     fix="`lorastrap repair`"))
        return
    res = subproc.run([str(python), str(verify.VERIFY_SCRIPT), "--json", "--pre-checks-only"]
                      + (["--driver-cuda", machine.cuda] if machine.cuda else []),
                      timeout=600, env=inst.env_in(prefix), cwd=prefix)
    report = verify.parse(res.stdout)
    if report is None:
        diag.findings.append(Finding("error", "python-broken", "the environment's Python could not run the "
                                     "pre-checks", why=inst._tail(res), fix="`lorastrap repair`"))
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

def the_lock(prefix: Path, envs_dir: Path, matrix: profiles.Matrix, machine: Machine) -> tuple[locking.Lock | None, str | None, dict | None]:
    """The environment's own lock and profile (kept by install), or for a foreign one the planned profile's."""
    record = inst._read_record(prefix)
    own = prefix / inst.RECORD_DIR / "conda-lock.yml"
    if record and own.exists():
        return locking.read_lock(own), record.get("profile"), record
    chosen = planner.plan(machine, matrix).profile
    if chosen:
        committed = locking.lock_path(envs_dir, chosen)
        if committed.exists():
            lk = locking.read_lock(committed)
            if machine.platform in lk.platforms:
                return lk, chosen, None
    return None, chosen, None


def diagnose(prefix: Path, *, envs_dir: Path, machine: Machine, imports: bool = True) -> Diagnosis:
    import time
    start = time.perf_counter()
    prefix = prefix.absolute()
    if not (prefix / "conda-meta").is_dir():
        raise UsageError(f"{prefix} is not a conda environment (no conda-meta/)",
                         fix="Pass the environment's prefix (--prefix) or name (--name).")
    matrix = profiles.load(envs_dir)
    lk, profile_name, record = the_lock(prefix, envs_dir, matrix, machine)
    diag = Diagnosis(prefix=str(prefix), profile=profile_name, lock=str(lk.path) if lk else None)
    if inst.journal_path(prefix).exists():
        diag.findings.append(Finding("error", "interrupted-transaction", "an install or repair of this "
                                     "environment was interrupted", why=f"{inst.journal_path(prefix)} is still there",
                                     fix="Run `lorastrap repair` (or the same install) again: it finishes "
                                         "the rollback first."))
    platform = (record or {}).get("platform") or machine.platform or ""
    records, owned = check_files(prefix, diag)
    check_lock(prefix, lk, platform, records, diag)
    owned |= check_pip(prefix, lk, platform, records, diag)
    check_machine(profile_name, record, matrix, machine, diag)
    if imports:
        check_imports(prefix, machine, diag)
    diag.unowned_files = unowned(prefix, owned | {str(inst.RECORD_DIR / "record.json")})
    if diag.unowned_files:
        diag.findings.append(Finding("info", "user-files", f"{len(diag.unowned_files)} file(s) no package owns, "
                                     f"e.g. {diag.unowned_files[0]}", why="your own files inside the environment",
                                     fix="repair carries them over and keeps them in the backup.", repair="none"))
    diag.seconds = round(time.perf_counter() - start, 3)
    return diag


def format_diagnosis(diag: Diagnosis) -> str:
    lines = [f"{diag.prefix}: profile {diag.profile or '?'}, lock {diag.lock or 'none'}"]
    for f in diag.findings:
        lines.append(f"[{f.severity}] {f.what}")
        if f.why:
            lines.append(f"    why: {f.why}")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    lines.append({"healthy": "verdict: healthy",
                  "repairable": "verdict: repairable — `lorastrap repair` rebuilds it from its lock",
                  "not-repairable": "verdict: not repairable as locked — `lorastrap repair --replan` "
                                    "rebuilds it with the profile that fits this machine now"}[diag.verdict])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------

def repair(prefix: Path, *, envs_dir: Path, machine: Machine, replan: bool = False, yes: bool = False,
           keep_backup: bool = True, confirm=None, narrate=lambda m: None, **install_args) -> tuple[Diagnosis, inst.Result]:
    """Rebuild PREFIX through the install transaction: from its own lock, or (replan) from the profile plan
    chooses now.  The old environment becomes the backup (kept unless keep_backup=False) and comes back on any
    failure; files no package owns are carried over."""
    import shutil
    import tempfile
    from lorastrap import filelock
    prefix = prefix.absolute()
    with filelock.held(inst.lock_file_path(prefix), what=str(prefix), narrate=narrate):
        done = inst.recover(prefix, narrate)  # an interrupted run first
        if done:
            narrate(done)
    diag = diagnose(prefix, envs_dir=envs_dir, machine=machine, imports=False)
    matrix = profiles.load(envs_dir)
    record = inst._read_record(prefix)
    own = prefix / inst.RECORD_DIR / "conda-lock.yml"
    tmp = Path(tempfile.mkdtemp(prefix="lorastrap-repair-"))
    try:
        if replan or record is None or not own.exists():
            name = planner.require_profile(planner.plan(machine, matrix))
            lock_file = None
            source = f"the profile plan chooses now ({name})"
        else:
            name = record["profile"]
            if name not in matrix.profiles:
                raise UsageError(f"{prefix} was built with profile {name!r}, which {envs_dir}/profiles.yaml lacks",
                                 fix="Pass the --envs-dir it was installed with, or use --replan.")
            lock_file = tmp / f"{name}.conda-lock.yml"
            shutil.copyfile(own, lock_file)  # PREFIX moves aside during the transaction
            source = f"its own lock (profile {name})"
        plan_text = [f"rebuild {prefix} from {source}",
                     f"keep the current environment as {inst.backup_path(prefix)}"
                     + ("" if keep_backup else " until the new one is verified"),
                     f"carry over {len(diag.unowned_files)} file(s) no package owns"]
        for line in plan_text:
            narrate(f"repair will: {line}")
        if not yes and confirm is not None and not confirm():
            raise UsageError("repair cancelled", fix="Run again and answer y, or pass --yes.")
        if inst.backup_path(prefix).exists():
            narrate(f"replacing the older backup {inst.backup_path(prefix)}")
            inst._remove_tree(inst.backup_path(prefix))
        result = inst.install(prefix=prefix, envs_dir=envs_dir, name=name, profile=matrix.profiles[name],
                              platform=machine.platform or record.get("platform"), lock_file=lock_file, force=True,
                              keep_backup=keep_backup, carry_over=tuple(diag.unowned_files),
                              driver_cuda=machine.cuda, narrate=narrate, **install_args)
        return diag, result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
