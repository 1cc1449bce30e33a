"""Step 4: the install transaction — a lock becomes a working environment at PREFIX, or nothing changes.

conda environments are not relocatable (prefix placeholders are written for the path they are linked at), so the
new environment is linked at PREFIX itself and the old one is what moves:

  1. preflight   lock parsed, platform present, free disk; the prefix's file lock taken
  2. fetch       every archive into the cache, sha256 checked against the lock (nothing of the user's touched)
  3. aside       PREFIX renamed to PREFIX.lorastrap-backup (one rename), recorded in the journal first
  4. link        the engine creates PREFIX from the checked archives; pip entries inside it
  5. check       every locked package in conda-meta with the lock's sha256, pip entries present, smoke command
  6. verify      the profile's verification command inside PREFIX
  7. commit      lock + record written into PREFIX/conda-meta/lorastrap/, backup dropped (unless --keep-backup)

On a failure in 3–6 (an error, Ctrl-C, SIGTERM) the new PREFIX is removed and the backup renamed back.  After a
crash (SIGKILL, power loss) the journal PREFIX.lorastrap-txn.json is still there: the next run reads it first and
finishes the rollback (or the commit) before anything else.  Re-running with the same lock is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorastrap import engines, filelock, lock as locking, paths, subproc
from lorastrap.cache import Cache, progress_printer
from lorastrap.errors import ConfigError, DiskError, LorastrapError, UsageError, VerifyError, INTERRUPTED
from lorastrap.profiles import Profile

EXTRACT_FACTOR = 3  # disk an environment takes, as a multiple of its archives (extracted + linked)
SMOKE_TIMEOUT_S = 300
VERIFY_TIMEOUT_S = 1800
RECORD_DIR = Path("conda-meta") / "lorastrap"


class Interrupted(LorastrapError):
    exit_code = INTERRUPTED


@dataclass
class Result:
    prefix: str
    profile: str
    platform: str
    engine: str
    lock: str
    changed: bool
    packages: int
    pip_packages: int
    downloaded_bytes: int = 0
    recovered: str | None = None
    backup: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    verify: dict | None = None


# --------------------------------------------------------------------------------------------------------------
# Where things live beside a prefix

def backup_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-backup")


def journal_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap-txn.json")


def lock_file_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".lorastrap.lock")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _remove_tree(path: Path) -> None:
    """Remove a folder: renamed out of the way first, so a crash never leaves a half-removed PREFIX."""
    if not path.exists() and not path.is_symlink():
        return
    trash = path.with_name(f"{path.name}.lorastrap-trash-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clear_trash(prefix: Path) -> None:
    for p in prefix.parent.glob(prefix.name + ".lorastrap-trash-*"):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Crash recovery

def recover(prefix: Path, narrate=lambda m: None) -> str | None:
    """Finish what a crashed run left (call with the prefix lock held).  Returns what was done, or None."""
    _clear_trash(prefix)
    journal = journal_path(prefix)
    if not journal.exists():
        return None
    try:
        state = json.loads(journal.read_text())
    except ValueError:
        state = {"state": "aside", "had_old": backup_path(prefix).exists()}
    backup = backup_path(prefix)
    if state.get("state") == "committing":
        narrate(f"an earlier run was committing {prefix}: finishing it")
        if backup.exists() and not state.get("keep_backup"):
            _remove_tree(backup)
        journal.unlink()
        return "completed the interrupted commit"
    # Any other state: roll back to what was there before.
    if backup.exists():
        narrate(f"an earlier run was interrupted: restoring the previous environment at {prefix}")
        _remove_tree(prefix)
        os.rename(backup, prefix)
        _fsync_dir(prefix.parent)
        what = "restored the previous environment"
    elif state.get("had_old"):
        what = "the previous environment was still in place"  # crashed before the rename
    else:
        narrate(f"an earlier run was interrupted: removing the partial environment at {prefix}")
        _remove_tree(prefix)
        what = "removed a partial environment"
    journal.unlink()
    return what


# --------------------------------------------------------------------------------------------------------------
# Checks

def conda_meta(prefix: Path) -> dict[str, dict]:
    out = {}
    meta = prefix / "conda-meta"
    if not meta.is_dir():
        return out
    for f in meta.glob("*.json"):
        try:
            rec = json.loads(f.read_text())
            out[rec["name"]] = rec
        except (ValueError, KeyError, OSError):
            continue
    return out


def site_packages(prefix: Path) -> Path | None:
    found = sorted((prefix / "lib").glob("python3*/site-packages")) if (prefix / "lib").is_dir() else []
    return found[-1] if found else None


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def pip_installed(prefix: Path) -> dict[str, str]:
    sp = site_packages(prefix)
    if sp is None:
        return {}
    out = {}
    for d in sp.glob("*.dist-info"):
        name, _, version = d.name[: -len(".dist-info")].partition("-")
        out[_norm(name)] = version
    return out


def mismatches(prefix: Path, entries: list[locking.Entry]) -> list[str]:
    """What in PREFIX differs from the lock's entries (empty: the environment is what the lock says)."""
    meta = conda_meta(prefix)
    pips = pip_installed(prefix) if any(e.manager == "pip" for e in entries) else {}
    problems = []
    for e in entries:
        if e.manager == "conda":
            rec = meta.get(e.name)
            if rec is None:
                problems.append(f"{e.name}: not in conda-meta")
            elif rec.get("sha256") != e.sha256 or str(rec.get("version")) != e.version:
                problems.append(f"{e.name}: conda-meta has {rec.get('version')} sha256 {rec.get('sha256')}, "
                                f"the lock {e.version} sha256 {e.sha256}")
        elif pips.get(_norm(e.name)) != e.version:
            problems.append(f"{e.name} (pip): not installed at {e.version}")
    return problems


def resolve_command(prefix: Path, argv: list[str], verify_script: Path) -> list[str]:
    argv = [a.replace("{verify_script}", str(verify_script)) for a in argv]
    exe = prefix / "bin" / argv[0]
    return [str(exe)] + argv[1:] if exe.exists() else argv


def env_in(prefix: Path, driver_cuda: str | None = None) -> dict[str, str]:
    """The environment a command inside PREFIX runs with: activated PATH, no outside Python or conda leaking in."""
    env = subproc.clean_env(drop=("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LORASTRAP_DRIVER_CUDA"),
                            prefixes=("CONDA_",), CONDA_PREFIX=str(prefix), HF_HUB_OFFLINE="1")
    if driver_cuda:
        env["LORASTRAP_DRIVER_CUDA"] = driver_cuda
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_in(prefix: Path, argv: list[str], *, timeout: float, driver_cuda: str | None = None) -> subproc.Result:
    return subproc.run(resolve_command(prefix, argv, paths.SCRIPTS / "verify_lora.py"), timeout=timeout,
                       env=env_in(prefix, driver_cuda), cwd=prefix)


# --------------------------------------------------------------------------------------------------------------
# The lock to install

def choose_lock(*, envs_dir: Path, name: str, profile: Profile, platform: str, frozen: bool,
                channels: list[str] | None, pip_index_url: str, narrate) -> locking.Lock:
    """The profile's committed lock when it covers this platform and is current; else lock now (unless frozen)."""
    committed = locking.lock_path(envs_dir, name)
    local = paths.data_dir() / "locks" / f"{name}.{platform}.conda-lock.yml"
    reason = f"{committed.name} does not exist"
    if committed.exists():
        lk = locking.read_lock(committed)
        if platform not in lk.platforms:
            reason = f"{committed.name} has no {platform} section"
        elif locking.is_stale(lk, envs_dir, profile):
            reason = f"{committed.name} is stale (its spec or virtual packages changed since it was written)"
        else:
            return lk
    if not frozen and local.exists():  # locked on an earlier run here, for the same spec and channels
        lk = locking.read_lock(local)
        wanted = [locking.channel_url(c) for c in channels] if channels else None
        if not locking.is_stale(lk, envs_dir, profile) and (wanted is None or lk.channels == wanted):
            return lk
    if frozen:
        raise ConfigError(f"no usable lock for profile {name} on {platform}: {reason}",
                          why="--frozen installs only from committed locks",
                          fix=f"Run `lorastrap lock --profile {name} --platform {platform}` and commit "
                              f"the lock, or drop --frozen.")
    narrate(f"{reason}: locking {name} for {platform} now")
    if local.exists():
        local.unlink()  # stale or for other channels: start afresh
    locking.lock(envs_dir=envs_dir, name=name, profile=profile, platforms=[platform], channels=channels, out=local,
                 pip_index_url=pip_index_url, narrate=narrate)
    return locking.read_lock(local)


# --------------------------------------------------------------------------------------------------------------
# The transaction

@contextmanager
def _signals_raise():
    """SIGTERM (and SIGHUP) raise like Ctrl-C inside the transaction, so the rollback runs."""
    def handler(signum, frame):
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}",
                          why="the install was interrupted", fix="Run the same command again; it will converge.")
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _pause_point(stage: str, narrate) -> None:
    """Crash-test hook: LORASTRAP_PAUSE_AT=<stage> makes the run stop here (tests kill it with SIGKILL)."""
    if os.environ.get("LORASTRAP_PAUSE_AT") == stage:
        narrate(f"paused at {stage} (LORASTRAP_PAUSE_AT)")
        while True:
            time.sleep(60)


def install(*, prefix: Path, envs_dir: Path, name: str, profile: Profile, platform: str, engine: str = "auto",
            frozen: bool = False, channels: list[str] | None = None, mirror: str | None = None,
            pip_index_url: str = locking.DEFAULT_PIP_INDEX, keep_backup: bool = False, wait: bool = True,
            run_verify: bool = True, min_free_mib: int = 512, plan_info: dict | None = None,
            driver_cuda: str | None = None, lock_file: Path | None = None, force: bool = False,
            carry_over: tuple[str, ...] = (), narrate=lambda m: None) -> Result:
    """Install (or rebuild, with force) PREFIX from a lock; see the module's docstring for the transaction.

    lock_file: install from this lock instead of the profile's; carry_over: paths relative to PREFIX (files no
    package owns) copied from the previous environment into the new one."""
    prefix = prefix.expanduser().absolute()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with filelock.held(lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate), _signals_raise():
        recovered = recover(prefix, narrate)
        if prefix.exists() and not (prefix / "conda-meta").is_dir() and any(prefix.iterdir()):
            raise UsageError(f"{prefix} exists and is not a conda environment (no conda-meta/)",
                             why="lorastrap replaces only environments; it never moves or deletes other folders",
                             fix="Choose another --prefix/--name, or empty that folder yourself.")
        lk = locking.read_lock(lock_file) if lock_file else choose_lock(
            envs_dir=envs_dir, name=name, profile=profile, platform=platform, frozen=frozen, channels=channels,
            pip_index_url=pip_index_url, narrate=narrate)
        entries = lk.for_platform(platform)
        if not entries:
            raise ConfigError(f"{lk.path}: no packages for {platform}",
                              fix=f"Lock for {platform}: `lorastrap lock --platform {platform}`.")
        conda_entries = [e for e in entries if e.manager == "conda"]
        pip_entries = [e for e in entries if e.manager == "pip"]
        eng = engines.find(engine)
        result = Result(prefix=str(prefix), profile=name, platform=platform, engine=eng.describe(), lock=str(lk.path),
                        changed=False, packages=len(conda_entries), pip_packages=len(pip_entries),
                        recovered=recovered, timings=timings)

        # No-op: the same lock is already installed and intact.
        record = _read_record(prefix)
        if not force and record and record.get("lock_digest") == lk.digest(platform) and not mismatches(prefix, entries):
            timings["total"] = time.perf_counter() - t0
            narrate(f"{prefix} already matches the lock ({len(entries)} packages): nothing to do")
            return result

        # Preflight: free disk where the cache and the environment go.
        cache = Cache(paths.cache_dir())
        _check_disk(cache.root, min_free_mib, 0, "the package cache")

        # Fetch and check every archive (conda and pip). Nothing of the user's is touched up to here.
        t = time.perf_counter()
        local: dict[str, Path] = {}
        total_bytes = 0
        for i, e in enumerate(conda_entries):
            url = locking.mirrored(e.url, lk.channels, mirror)
            path, got = cache.fetch(url, e.sha256, e.filename, progress=progress_printer(e.filename))
            result.downloaded_bytes += got
            local[e.name] = path
            total_bytes += path.stat().st_size
            if i == 0:
                _pause_point("download", narrate)
        timings["fetch"] = time.perf_counter() - t
        narrate(f"{len(conda_entries)} archives checked against the lock's sha256 "
                f"({result.downloaded_bytes / 2**20:.1f} MiB downloaded, {timings['fetch']:.2f} s)")
        _check_disk(prefix.parent, min_free_mib, EXTRACT_FACTOR * total_bytes, str(prefix.parent))

        work = Path(tempfile.mkdtemp(prefix="lorastrap-install-"))
        try:
            # The engine gets the archives checked above, not the channel's URLs.
            local_lock = locking.rewritten(
                lk, work / f"{name}.{platform}.conda-lock.yml", platform=platform,
                url_for=lambda p: local[p["name"]].as_uri() if p["manager"] == "conda" else p["url"])
            had_old = prefix.exists()
            journal = journal_path(prefix)
            _write_json(journal, {"state": "aside", "had_old": had_old, "pid": os.getpid(), "lock": str(lk.path)})
            try:
                if had_old:
                    os.rename(prefix, backup_path(prefix))
                    _fsync_dir(prefix.parent)
                    result.backup = str(backup_path(prefix))
                _pause_point("aside", narrate)
                _write_json(journal, {"state": "linking", "had_old": had_old, "pid": os.getpid()})
                t = time.perf_counter()
                narrate(f"linking {len(conda_entries)} packages into {prefix} with {eng.describe()}")
                engines.link(eng, prefix=prefix, lock_file=local_lock, platform=platform,
                             cache_dir=cache.root / "extracted")
                timings["engine"] = time.perf_counter() - t
                if pip_entries:
                    t = time.perf_counter()
                    narrate(f"installing {len(pip_entries)} pip entr{'y' if len(pip_entries) == 1 else 'ies'}")
                    engines.pip_install(prefix, [f"{e.name} @ {e.url} --hash=sha256:{e.sha256}" for e in pip_entries])
                    timings["pip"] = time.perf_counter() - t
                if carry_over and had_old:
                    _carry_over(backup_path(prefix), prefix, carry_over, narrate)
                _pause_point("linked", narrate)
                t = time.perf_counter()
                problems = mismatches(prefix, entries)
                if problems:
                    raise engines.EngineError(f"the new environment does not match the lock ({len(problems)} problems)",
                                              why="; ".join(problems[:5]),
                                              fix="Rerun; if it persists, report it with --debug output.")
                smoke = run_in(prefix, profile.smoke, timeout=SMOKE_TIMEOUT_S)
                if not smoke.ok:
                    raise VerifyError("the new environment failed its smoke test: " + " ".join(profile.smoke),
                                      why=_tail(smoke), fix="Nothing changed: the previous environment was restored.")
                timings["check"] = time.perf_counter() - t
                _write_json(journal, {"state": "verifying", "had_old": had_old, "pid": os.getpid()})
                if run_verify:
                    t = time.perf_counter()
                    narrate("verifying: " + " ".join(profile.verify))
                    _pause_point("verify", narrate)
                    result.verify = _verify(prefix, profile, driver_cuda)
                    timings["verify"] = time.perf_counter() - t
                _write_record(prefix, lk, platform, name, result, plan_info)
                _write_json(journal, {"state": "committing", "had_old": had_old, "keep_backup": keep_backup})
                _pause_point("commit", narrate)
                if had_old and not keep_backup:
                    _remove_tree(backup_path(prefix))
                    result.backup = None
                journal.unlink()
                _fsync_dir(prefix.parent)
            except BaseException as exc:
                _rollback(prefix, had_old, narrate)
                journal.unlink(missing_ok=True)
                if isinstance(exc, KeyboardInterrupt):
                    raise Interrupted("interrupted (Ctrl-C)", why="the install was interrupted",
                                      fix="Run the same command again; it will converge.") from exc
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.changed = True
        timings["total"] = time.perf_counter() - t0
        return result


def _carry_over(old: Path, new: Path, rels: tuple[str, ...], narrate) -> None:
    """Copy the user's files (owned by no package) from the previous environment; never over a package's file."""
    copied = 0
    for rel in rels:
        src, dst = old / rel, new / rel
        if dst.exists() or dst.is_symlink() or not (src.is_file() or src.is_symlink()):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
        copied += 1
    narrate(f"carried over {copied} file(s) no package owns (also kept in the backup)")


def _rollback(prefix: Path, had_old: bool, narrate) -> None:
    narrate(f"removing the partial environment at {prefix}")
    _remove_tree(prefix)
    backup = backup_path(prefix)
    if had_old and backup.exists():
        narrate(f"restoring the previous environment at {prefix}")
        os.rename(backup, prefix)
        _fsync_dir(prefix.parent)


def _tail(res: subproc.Result, lines: int = 5) -> str:
    text = (res.stderr or res.stdout or "").strip().splitlines()
    return " | ".join(text[-lines:]) or f"exit code {res.returncode}"


def _verify(prefix: Path, profile: Profile, driver_cuda: str | None) -> dict:
    from lorastrap import verify
    res = run_in(prefix, profile.verify, timeout=VERIFY_TIMEOUT_S, driver_cuda=driver_cuda)
    report = verify.parse(res.stdout)
    if not res.ok:
        failed = [f"{c['name']}: {c.get('cause') or c['detail']}" for c in (report or {}).get("checks", [])
                  if c["status"] == "fail"]
        raise VerifyError("the new environment failed verification: " + " ".join(profile.verify),
                          why="; ".join(failed[:3]) or _tail(res),
                          fix="Nothing changed: the previous environment was restored. "
                              "Run `lorastrap plan` to check the profile fits.")
    return {"ok": True, "command": profile.verify, "verdict": (report or {}).get("verdict", "pass"),
            "report": report}


def _check_disk(where: Path, min_free_mib: int, need_bytes: int, what: str) -> None:
    from lorastrap.detect import existing_parent
    base = existing_parent(where)
    free = shutil.disk_usage(base).free
    need = need_bytes + min_free_mib * 2**20
    if free < need:
        raise DiskError(f"not enough free disk for {what}: {free / 2**20:.0f} MiB free at {base}, "
                        f"{need / 2**20:.0f} MiB needed", why=f"{need_bytes / 2**20:.0f} MiB for the environment plus "
                                                            f"{min_free_mib} MiB kept free (--min-free-mib)",
                        fix="Free disk space, choose another --prefix, or set LORASTRAP_HOME on a larger disk. "
                            "Nothing was changed.")


def _read_record(prefix: Path) -> dict | None:
    try:
        return json.loads((prefix / RECORD_DIR / "record.json").read_text())
    except (OSError, ValueError):
        return None


def _write_record(prefix: Path, lk: locking.Lock, platform: str, name: str, result: Result, plan_info) -> None:
    d = prefix / RECORD_DIR
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lk.path, d / "conda-lock.yml")
    _write_json(d / "record.json", {
        "schema_version": 1, "profile": name, "platform": platform, "lock_digest": lk.digest(platform),
        "lock_source": str(lk.path), "engine": result.engine, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "plan": plan_info, "verify": result.verify})


def result_dict(result: Result) -> dict:
    return asdict(result)


KEY_PACKAGES = ("python", "pytorch", "transformers", "peft", "accelerate", "bitsandbytes", "cuda-version")


def node_report(result: Result, machine) -> dict:
    """The JSON a node reports (setup.sh --report, install --report, the fleet report's rows): schema_version 1."""
    import socket
    doc = {"schema_version": 1, "host": socket.gethostname(), "ok": True}
    doc.update(asdict(result))
    versions = {}
    try:
        for e in locking.read_lock(Path(result.lock)).for_platform(result.platform):
            if e.name in KEY_PACKAGES:
                versions[e.name] = f"{e.version} ({e.build})" if e.build else e.version
    except LorastrapError:
        pass
    doc["versions"] = versions
    doc["machine"] = {"platform": machine.platform, "driver": machine.nvidia.driver_version,
                      "driver_cuda": machine.cuda,
                      "gpus": [f"{g.name} (cc {g.compute_capability})" for g in machine.nvidia.gpus]}
    doc["verify_verdict"] = (result.verify or {}).get("verdict") if result.verify else (
        "unchanged" if not result.changed else "skipped")
    return doc


def activation_hint(prefix: Path) -> str:
    return f"conda activate {prefix}   (or: micromamba activate {prefix}; or: export PATH={prefix}/bin:$PATH)"

