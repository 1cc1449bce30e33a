"""Step 4: the install transaction — a lock becomes a working environment at PREFIX, or nothing changes.

conda environments are not relocatable (prefix placeholders are written for the path they are linked at), so the
new environment is linked at PREFIX itself and the old one is what moves (txn.py keeps the journal):

  1. preflight   lock parsed, platform present, free disk; the prefix's file lock taken
  2. fetch       every archive and wheel into the cache (in parallel, resumable), sha256 checked against the
                 lock (nothing of the user's touched)
  3. aside       PREFIX renamed to PREFIX.lorastrap-backup (one rename), between two journal writes
  4. link        the engine creates PREFIX from the checked archives; the checked wheels inside it (uv, or
                 pip); the user's files
                 (owned by no package) copied over from the backup when repairing
  5. check       every locked package in conda-meta with the lock's sha256, pip entries present, smoke command
  6. verify      the profile's verification command inside PREFIX; lock + record written into
                 PREFIX/conda-meta/lorastrap/
  7. commit      the journal says "committing" — the point of no return — then the backup is dropped (unless
                 --keep-backup) and the journal removed

On a failure in 3–6 (an error, Ctrl-C, SIGTERM, SIGHUP) the new PREFIX is removed and the backup renamed back.
From step 7 on nothing rolls back: Ctrl-C, SIGTERM and SIGHUP are held from just before the "committing" journal
to the end of the commit (and while moving aside, rolling back or recovering), then honoured (exit 130, the new
environment in place).  After a crash (SIGKILL, power loss) the journal PREFIX.lorastrap-txn.json is still there:
the next run reads it first and finishes the rollback (before 7) or the commit (from 7) before anything else.
Re-running with the same lock is a no-op.
"""

from __future__ import annotations

import os
import shutil
import filecmp
import signal
import stat
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, field
from pathlib import Path

from lorastrap.install import ahead, archive, engines, generations, prefix as pfx, txn, verify
from lorastrap.core import fsutil, locks, paths, signals, subproc
from lorastrap.core.credentials import shown
from lorastrap.locking import channels as chans, choose, lockfile
from lorastrap.install.cache import Cache, dist_name, redirect_hosts_from
from lorastrap.machine.host import existing_parent
from lorastrap.machine.model import Machine
from lorastrap.core.errors import (BusyError, ConfigError, DiskError, Interrupted, LorastrapError, NotOursError,
                                   UnsafePackageError, UsageError, VerifyError)
from lorastrap.matrix.profiles import Matrix, Profile
from lorastrap.core.records import BuiltWith, EnvRecord, Journal, NodeReport
from lorastrap.core.plain import Struct, struct

EXTRACT_FACTOR = 3  # disk an environment takes, as a multiple of its archives (extracted + linked)
SMOKE_TIMEOUT_S = 300
KEY_PACKAGES = ("python", "pytorch", "transformers", "peft", "accelerate", "bitsandbytes", "cuda-version")
RESTORED = "the previous environment was restored."  # a failure's fix text, true only when there was one


@struct
class InstallResult(Struct):
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
    repaired: str | None = None  # why a run that had nothing to change rebuilt the environment
    backup: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    verify: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _signals_raise():
    """SIGTERM (and SIGHUP) raise like Ctrl-C inside the transaction, so the rollback runs."""
    def handler(signum, frame):
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}",
                          why="the install was interrupted", fix="Run the same command again; it will converge.")
    with signals.handled((signal.SIGTERM, signal.SIGHUP), handler):
        yield


def _pause_point(stage: str, narrate) -> None:
    """Crash-test hook: LORASTRAP_PAUSE_AT=<stage> makes the run stop here (tests signal it there)."""
    if os.environ.get("LORASTRAP_PAUSE_AT") == stage:
        narrate(f"paused at {stage} (LORASTRAP_PAUSE_AT)")
        time.sleep(float(os.environ.get("LORASTRAP_PAUSE_S", "1e9")))  # LORASTRAP_PAUSE_S: then go on


def install(*, prefix: Path, wait: bool = True, narrate=lambda m: None, **kwargs) -> InstallResult:
    """Install (or rebuild, with force) PREFIX from a lock, under the prefix's file lock (waiting for another run,
    or failing at once with wait=False); see install_locked and the module's docstring."""
    prefix = check_prefix(prefix.expanduser().absolute(), narrate)
    made = [p for p in reversed(prefix.parents) if not p.exists()]  # folders this run creates for PREFIX
    held_it = False
    try:
        with locks.held(txn.lock_file_path(prefix), what=str(prefix), wait=wait, narrate=narrate):
            held_it = True
            return install_locked(prefix=prefix, narrate=narrate, **kwargs)
    except BaseException:
        if held_it and not (pfx.made_by_lorastrap(prefix) or txn.journal_path(prefix).exists()
                            or txn.backup_path(prefix).exists()):
            txn.lock_file_path(prefix).unlink(missing_ok=True)  # refused: no lock file left (waiters re-check)
        if not prefix.exists():  # refused or failed before anything was made: leave no empty folders behind
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise


def check_prefix(prefix: Path, narrate=lambda m: None) -> Path:
    """A prefix lorastrap may create or replace: not the root, not a file, not under a file, not the data dir (or
    a folder holding it).  A symlink is followed: the environment is built where it points, the link stays."""
    fix = "Choose another --prefix (or --name)."
    long_part = next((part for part in prefix.parts if len(part.encode()) > 255), None)
    if long_part:
        raise UsageError(f"--prefix: the folder name {long_part[:40]}… is longer than 255 bytes",
                         why="no Linux or macOS filesystem takes names that long", fix=fix)
    if prefix.is_symlink():
        target = prefix.resolve()
        narrate(f"{prefix} is a link to {target}: installing there (the link stays)")
        prefix = target
    if prefix.parent == prefix:
        raise UsageError(f"--prefix {prefix} is the filesystem's root", why="an environment is a folder of its own",
                         fix=fix)
    if prefix.exists() and not prefix.is_dir():
        raise UsageError(f"{prefix} exists and is not a folder", why="lorastrap never replaces files", fix=fix)
    parent = existing_parent(prefix.parent)
    if not parent.is_dir():
        raise UsageError(f"{parent} is a file, so {prefix} cannot be made", why="a file stands where a folder must be",
                         fix=fix)
    data = paths.data_dir().absolute()
    if prefix == data or prefix in data.parents or (data in prefix.parents and paths.envs_dir() not in prefix.parents):
        raise UsageError(f"--prefix {prefix} would overlap lorastrap's data dir {data}",
                         why="the data dir holds the package cache and the environments", fix=fix)
    return prefix


def install_locked(*, prefix: Path, envs_dir: Path, name: str, profile: Profile, platform: str,
                   matrix: Matrix | None = None, engine: str | None = None, frozen: bool = False,
                   channels: list[str] | None = None, mirror: str | dict[str, str] | None = None,
                   pip_index_url: str = chans.DEFAULT_PIP_INDEX, keep_backup: bool = False, run_verify: bool = True,
                   min_free_mib: int = 512, plan_info: dict | None = None, driver_cuda: str | None = None,
                   lock_file: Path | None = None, force: bool = False, carry_over: tuple[str, ...] = (),
                   link_mode: str = "hardlink", check_cache: bool = False, replace_foreign: bool = False,
                   allow_link_scripts: bool = False, narrate=lambda m: None) -> InstallResult:
    """The transaction, with the prefix lock already held by the caller.

    lock_file: install from this lock instead of the profile's; carry_over: paths relative to PREFIX (files no
    package owns) copied from the previous environment into the new one; link_mode: "hardlink" (files shared
    with the package cache, as conda does) or "copy" (each file its own: a reflink where the filesystem has them);
    check_cache: hash every extracted copy in the cache against its package before linking (repair);
    replace_foreign: PREFIX may be a conda environment lorastrap did not make (no record in conda-meta/lorastrap/:
    conda's, micromamba's, a Miniforge base) — the user named it with --force; it is then always kept as the
    backup, never deleted; allow_link_scripts: install packages that carry link scripts (see _link_scripts)."""
    prefix = prefix.expanduser().absolute()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _signals_raise(), ExitStack() as stack:
        recovered = generations.recover_all(prefix, narrate)  # a killed rollback's renames, then a killed transaction
        fsutil.remove_orphans(paths.cache_dir(), ".lorastrap-install-")  # work folders of runs killed earlier
        fsutil.remove_orphans(paths.cache_dir() / "extracted", paths.PARTIAL, marked=True)  # half unpacked
        stack.enter_context(subproc.recording_groups(txn.children_path(prefix)))
        if recovered:
            narrate(recovered)
        if prefix.exists() and not pfx.is_conda_env(prefix) and any(prefix.iterdir()):
            raise UsageError(f"{prefix} exists and is not a conda environment (no conda-meta/)",
                             why="lorastrap replaces only environments; it never moves or deletes other folders",
                             fix="Choose another --prefix/--name, or empty that folder yourself.")
        foreign = False  # nothing is carried out of another tool's environment: it is kept whole instead
        if prefix.exists() and pfx.is_conda_env(prefix) and not pfx.made_by_lorastrap(prefix):
            if not replace_foreign:
                raise NotOursError(
                    f"{prefix} is a conda environment lorastrap did not make (no record in conda-meta/lorastrap/)",
                    why="lorastrap replaces only environments it made; this one is another tool's (conda, "
                        "micromamba, a Miniforge base install) or was made by hand",
                    fix="Choose another --prefix/--name, or pass --force to replace it (it is then kept whole as "
                        f"{txn.backup_path(prefix)}).")
            narrate(f"{prefix} was not made by lorastrap: replacing it as asked (--force); it is kept whole as "
                    f"{txn.backup_path(prefix)}")
            keep_backup, carry_over = True, ()
            foreign = True
        lk = lockfile.read_lock(lock_file) if lock_file else choose.choose(
            envs_dir=envs_dir, name=name, profile=profile, platform=platform, frozen=frozen, channels=channels,
            pip_index_url=pip_index_url, narrate=narrate)
        entries = lk.for_platform(platform)
        if not entries:
            raise ConfigError(f"{lk.path}: no packages for {platform}",
                              fix=f"Lock for {platform}: `lorastrap lock --platform {platform}`.")
        odd = next((e for e in entries if e.filename in ("", ".", "..") or "\0" in e.url
                    or "\\" in e.filename), None)
        if odd:
            raise ConfigError(f"{lk.path}: the URL of {odd.name} ({odd.url!r}) does not end in a file name",
                              why="each locked package is one archive (…/NAME-VERSION-BUILD.conda, a wheel); a URL "
                                  "ending in / or /.. names none",
                              fix="Re-lock: `lorastrap lock`, or correct that URL. Nothing was changed.")
        own = {chans.channel_key(c) for c in lk.channels}  # a lock's channels hold no login
        if isinstance(mirror, str) and len(own) > 1 and chans.channel_key(mirror) not in own:
            raise UsageError(f"--mirror {shown(mirror)}: the lock uses {len(lk.channels)} channels "
                             f"({', '.join(lk.channels)})",
                             why="one mirror without its channel would stand for all of them (wrong URLs)",
                             fix="Name the channel each mirror stands for: --mirror CHANNEL=URL (repeatable), "
                                 f"e.g. --mirror {lk.channels[0]}={shown(mirror)}.")
        conda_entries = [e for e in entries if e.manager == "conda"]
        pip_entries = [e for e in entries if e.manager == "pip"]
        unmet = lockfile.missing_dependencies(entries)
        if unmet:
            raise ConfigError(f"{lk.path}: {len(unmet)} dependenc{'y' if len(unmet) == 1 else 'ies'} of locked "
                              f"packages are not in the lock for {platform}, e.g. {unmet[0]}",
                              why="the lock is incomplete (cut by hand, or made by a tool that dropped a package)",
                              fix="Re-lock: `lorastrap lock`. Nothing was changed.")
        result = InstallResult(prefix=str(prefix), profile=name, platform=platform, engine="",
                               lock=str(lk.path), changed=False, packages=len(conda_entries),
                               pip_packages=len(pip_entries), recovered=recovered, timings=timings)

        # No-op: the same lock is already installed and intact (the engine that built it is the one reported).
        # Intact: every file of every package there at its size; if not, the run rebuilds it (as repair does).
        record = pfx.read_record(prefix)
        if not force and record and record.lock_digest == lk.digest(platform) and not pfx.mismatches(prefix, entries):
            damaged = pfx.damaged_files(prefix)
            if not damaged:
                result.engine = record.engine
                timings["total"] = time.perf_counter() - t0
                narrate(f"{prefix} already matches the lock ({len(entries)} packages, their files all there): "
                        f"nothing to do")
                return result
            result.repaired = (f"{len(damaged)} file(s) of its packages were missing or changed, e.g. "
                               + "; ".join(damaged[:3]))
            narrate(f"{prefix} matches the lock, but {result.repaired}: rebuilding it from the lock")
            force = check_cache = True
        eng = engines.find(engine, narrate=narrate)
        result.engine = eng.describe()

        # Preflight: free disk where the cache and the environment go.
        cache = Cache(paths.cache_dir(), redirect_hosts=redirect_hosts_from(
            [*(lk.channels or []), *(channels or []),
             *((mirror.values() if isinstance(mirror, dict) else [mirror or ""])), pip_index_url]))
        _check_disk(cache.root, min_free_mib, 0, "the package cache")

        # Fetch and check every archive and wheel, in parallel. Nothing of the user's is touched up to here.
        t = time.perf_counter()
        _pause_point("download", narrate)
        unpacked_ahead: set[str] = set()  # what the embedded engine's worker unpacks while the downloads go on

        def unpack_ahead(path: Path, sha256: str) -> None:  # an archive just checked: its sha256, its containment
            if ahead.unpack(path, sha256, cache.root / "extracted"):
                unpacked_ahead.add(dist_name(path.name))
        worker_unpacks = eng.kind == "rattler"
        logins = login_sources(channels, mirror, envs_dir, profile)
        fetched = cache.fetch_all(sources_to_fetch(cache, entries, lk.channels, mirror, pip_index_url, logins),
                                  inspect=True,
                                  on_ready=unpack_ahead if worker_unpacks else None, narrate=narrate)
        local: dict[tuple[str, str], Path] = {(e.manager, e.name): path for e, (path, _) in zip(entries, fetched)}
        archives = {n: p for (m, n), p in local.items() if m == "conda"}
        for e in conda_entries if worker_unpacks else []:  # the ones the cache had already: checked when they
            if dist_name(archives[e.name].name) not in unpacked_ahead:  # came, contained once inspected
                cache.inspect(archives[e.name])
                unpack_ahead(archives[e.name], e.sha256)
        result.downloaded_bytes = sum(got for _, got in fetched)
        total_bytes = sum(path.stat().st_size for path, _ in fetched)
        timings["fetch"] = time.perf_counter() - t
        narrate(f"{len(entries)} packages checked against the lock's sha256 "
                f"({result.downloaded_bytes / 2**20:.1f} MiB downloaded, {timings['fetch']:.2f} s)")
        # Containment, before any engine sees an archive: no path of any package leaves the prefix.
        inspected = {n: cache.inspect(p) for n, p in archives.items()}
        archive.check_together(inspected)
        _link_scripts(inspected, eng, allow_link_scripts, narrate)
        unpacked_bytes = sum(i["unpacked_bytes"] for i in inspected.values())
        _check_disk(prefix.parent, min_free_mib,
                    max(EXTRACT_FACTOR * total_bytes, total_bytes + unpacked_bytes * (2 if link_mode == "copy" else 1)),
                    str(prefix.parent), fix_where="choose a --prefix on a larger disk")
        _check_prefix_length(prefix, {n: info["placeholder"] for n, info in inspected.items()})
        # The unpacked copies the engine will link from: the embedded engine's, or micromamba/mamba's own cache.
        unpacked = (cache.root / "extracted" if eng.kind == "rattler"
                    else engines.engine_root(eng, cache.root / "extracted") / "pkgs")
        with engines.engine_cache_held(eng, cache.root / "extracted", narrate=narrate):  # not while it unpacks
            cache.check_extracted([p for p in archives.values() if dist_name(p.name) not in unpacked_ahead],
                                  full=check_cache, extracted=unpacked, narrate=narrate)
        # The copies not there yet: the worker may still unpack some ahead (those it did are "fresh"), the link
        # step unpacks the others itself — checked once it has, beside the pip step (_restamp).
        at_link = [p for p in archives.values() if not (unpacked / dist_name(p.name)).is_dir()]

        work = Path(tempfile.mkdtemp(prefix=f".lorastrap-install-{fsutil.owner_tag()}.", dir=cache.root))
        try:
            # The engine gets the archives checked above, laid out as a channel, not the channel's URLs.
            local_lock = engines.hand_over(lk, platform, archives, cache.root / "channel", work)
            had_old = prefix.exists()
            if had_old and not carry_over and not foreign:
                carry_over = tuple(pfx.user_files(prefix))  # the user's files come along on a switch too
            backup = txn.backup_path(prefix)
            if had_old and backup.exists():
                narrate(f"replacing the older backup {backup}")
                fsutil.remove_tree(backup)

            def journal(state: str) -> None:
                txn.write_journal(prefix, Journal(state=state, had_old=had_old, pid=os.getpid(), lock=str(lk.path),
                                                  keep_backup=keep_backup))

            try:
                with txn.deferred_signals("while moving the previous environment aside"):
                    # Each state is a durable write (two fsyncs); a recovery tells only "committing" from the rest,
                    # so a state that changes nothing is not written: "aside" with nothing to move aside (the
                    # "linking" one is written before PREFIX is made), "verifying" when nothing verifies.
                    if had_old:
                        journal("aside")
                        os.rename(prefix, backup)
                        fsutil.fsync_dir(prefix.parent)
                        result.backup = str(backup)
                    journal("linking")
                _pause_point("aside", narrate)
                _build(prefix=prefix, eng=eng, local_lock=local_lock, platform=platform, cache=cache, work=work,
                       entries=entries, wheels=local, profile=profile, link_mode=link_mode,
                       carry_from=backup if carry_over and had_old else None,
                       carry_over=carry_over, timings=timings, narrate=narrate,
                       # The copies the engine just linked from were checked above (or unpacked in this run from
                       # the checked archives); the new links moved their link counts and ctimes: record those, so
                       # that the next quick check takes a ctime moved without a link count for an edit.
                       after_link=lambda fresh: _restamp(cache, eng, list(archives.values()), unpacked, fresh,
                                                         at_link, {p: inspected[n]["entries"]
                                                                   for n, p in archives.items()}))
                if run_verify:
                    journal("verifying")
                    t = time.perf_counter()
                    narrate("verifying: " + " ".join(profile.verify))
                    _pause_point("verify", narrate)
                    result.verify = verify.verify_profile(prefix, profile, matrix=matrix, driver_cuda=driver_cuda)
                    timings["verify"] = time.perf_counter() - t
                pfx.write_record(prefix, EnvRecord(
                    profile=name, platform=platform, lock_digest=lk.digest(platform), lock_source=str(lk.path),
                    engine=result.engine, installed_at=pfx.now(), plan=plan_info, verify=result.verify,
                    built_with=_built_with(envs_dir, channels, mirror, pip_index_url, link_mode,
                                           engine or os.environ.get("LORASTRAP_ENGINE"))), lk.path)
                commit_signals = txn.deferred_signals(f"after the commit: {prefix} is the new environment")
                commit_signals.__enter__()  # held from before the point of no return to the end of the commit
            except BaseException as exc:
                with txn.deferred_signals(swallow=True):
                    narrate(txn.rollback(prefix, had_old, narrate))
                    txn.clear_journal(prefix)
                if not had_old and isinstance(exc, LorastrapError) and RESTORED in exc.fix:  # say what is true
                    exc.fix = exc.fix.replace(RESTORED, f"there was no environment at {prefix} before, and the new "
                                                        "one was removed.")
                if isinstance(exc, KeyboardInterrupt):
                    raise Interrupted("interrupted (Ctrl-C)", why="the install was interrupted; nothing changed",
                                      fix="Run the same command again; it will converge.") from exc
                raise
            # The point of no return: once this journal is written, the new environment is final and nothing rolls
            # back; a run that dies from here on is finished by the next one.
            try:
                journal("committing")
                _pause_point("commit", narrate)
                if had_old and not keep_backup:
                    fsutil.remove_tree(backup)
                    result.backup = None
                txn.clear_journal(prefix)
            finally:
                commit_signals.__exit__(None, None, None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result.changed = True
        timings["total"] = time.perf_counter() - t0
        return result


def _built_with(envs_dir: Path, channels, mirror, pip_index_url: str, link_mode: str, engine) -> BuiltWith:
    """What the record keeps of the sources, for `update` and `repair` to reuse: no user:password (the record is
    in the environment, readable by whoever may run it; PEP 610's direct_url.json redacts them likewise) — a
    later run gets them from the flags given then, or from .netrc."""
    from lorastrap.core.credentials import without_login
    if isinstance(mirror, dict):
        mirror = {without_login(channel): without_login(url) for channel, url in mirror.items()}
    elif mirror:
        mirror = without_login(mirror)
    return BuiltWith(envs_dir=str(envs_dir.absolute()),
                     channels=None if channels is None else [without_login(c) for c in channels], mirror=mirror,
                     pip_index_url=pip_index_url and without_login(pip_index_url), link_mode=link_mode, engine=engine)


def _restamp(cache: Cache, eng, archives: list[Path], unpacked: Path, fresh: frozenset,
             at_link: list[Path] = (), checked: dict[Path, list] | None = None) -> None:
    """Restamp the unpacked copies just linked from — unless another installer's micromamba holds its cache now
    (not waited for: without the new stamps the next check hashes those copies again, nothing worse).

    The copies the link step unpacked itself (AT_LINK: not there before the link, less the FRESH ones the worker
    unpacked ahead meanwhile) are hashed whole instead, against CHECKED (each archive's paths.json as inspected
    right after its sha256 was checked, not as the archive is now), and stamped: the engine reads the archive
    without checking its sha256 again (py-rattler 0.28 records the lock's sha256 in its cache entry, not the one
    of the bytes it read), so this is what says that the new environment's files are the checked package's; a copy
    that differs fails the install (rolled back).  That check is no hint: it waits for a cache another installer
    holds.  And the next install does not hash those copies again (the large set's first warm install after a
    cold one: 120 ms of its quick check)."""
    unchecked = [p for p in at_link if dist_name(p.name) not in fresh]
    if unchecked:
        with engines.engine_cache_held(eng, cache.root / "extracted"):
            bad = cache.check_extracted(unchecked, full=True, extracted=unpacked, entries=checked)
        if bad:
            raise engines.EngineError(
                f"the engine unpacked {len(bad)} package(s) whose files differ from the checked archive: "
                f"{', '.join(bad[:5])}",
                why="an archive in the package cache changed after it was checked, or the engine unpacked it "
                    "wrongly; the environment linked those files",
                fix="Nothing changed: the previous environment was restored. Run the install again (the copies "
                    "were removed); if it persists, run `lorastrap repair` and report it.")
    done = set(unchecked)
    try:
        with engines.engine_cache_held(eng, cache.root / "extracted", wait=False):
            cache.restamp_extracted([p for p in archives if p not in done], extracted=unpacked, fresh=fresh)
    except BusyError:
        pass


def _build(*, prefix: Path, eng, local_lock: Path, platform: str, cache: Cache, work: Path, entries: list,
           wheels: dict[tuple[str, str], Path], profile: Profile, link_mode: str, carry_from: Path | None,
           carry_over: tuple[str, ...], timings: dict, narrate, after_link=lambda fresh: None) -> None:
    """Link the new environment at PREFIX (the old one is aside), add pip entries and the user's files, check it.
    AFTER_LINK(the packages the worker unpacked ahead) runs in a thread of its own once the engine is done, beside
    the pip step and the checks."""
    conda_entries = [e for e in entries if e.manager == "conda"]
    t = time.perf_counter()
    narrate(f"linking {len(conda_entries)} packages into {prefix} with {eng.describe()}")
    fresh = engines.link(eng, prefix=prefix, lock_file=local_lock, platform=platform,
                         cache_dir=cache.root / "extracted", narrate=narrate)
    if link_mode == "copy":
        files, reflinked = fsutil.unshare_tree(prefix)
        narrate(f"link mode copy: {files} files made the environment's own ({reflinked} as reflinks)")
    timings["engine"] = time.perf_counter() - t
    failed: list[BaseException] = []

    def beside_the_pip_step() -> None:  # a plain thread: a warm install never imports concurrent.futures (~4 ms)
        try:
            after_link(fresh)
        except BaseException as exc:  # raised in the main thread once the pip step and the checks are done
            failed.append(exc)
    beside = threading.Thread(target=beside_the_pip_step, name="lorastrap-after-link")
    beside.start()
    try:
        _pip_and_check(prefix=prefix, entries=entries, wheels=wheels, profile=profile, work=work, cache=cache,
                       carry_from=carry_from, carry_over=carry_over, timings=timings, narrate=narrate)
    finally:
        beside.join()
    if failed:
        raise failed[0]


def _pip_and_check(*, prefix: Path, entries: list, wheels: dict[tuple[str, str], Path], profile: Profile,
                   work: Path, cache: Cache, carry_from: Path | None, carry_over: tuple[str, ...], timings: dict,
                   narrate) -> None:
    pip_entries = [e for e in entries if e.manager == "pip"]
    if pip_entries:
        t = time.perf_counter()
        narrate(f"installing {len(pip_entries)} pip entr{'y' if len(pip_entries) == 1 else 'ies'}")
        how = engines.pip_install(prefix, [(e.name, wheels[("pip", e.name)], e.sha256) for e in pip_entries], work,
                                  uv_cache=cache.root / "uv")
        timings["pip"] = time.perf_counter() - t
        narrate(f"pip entries installed with {how} ({timings['pip']:.2f} s)")
    if carry_from is not None:
        _carry_over(carry_from, prefix, carry_over, narrate)
    _pause_point("linked", narrate)
    t = time.perf_counter()
    problems = pfx.mismatches(prefix, entries)
    if problems:
        raise engines.EngineError(f"the new environment does not match the lock ({len(problems)} problems)",
                                  why="; ".join(problems[:5]),
                                  fix="Rerun; if it persists, report it with --debug output.")
    smoke = pfx.run_in(prefix, profile.smoke, timeout=SMOKE_TIMEOUT_S)
    if not smoke.ok:
        raise VerifyError("the new environment failed its smoke test: " + " ".join(profile.smoke),
                          why=smoke.tail(5), fix="Nothing changed: the previous environment was restored.")
    timings["check"] = time.perf_counter() - t


def login_sources(channels, mirror, envs_dir: Path, profile: Profile):
    """The URLs whose login a lock's archive URL (which holds none) takes when it lies under one: the --channel
    and --mirror URLs given now, else the spec's channels (what the lock was made from); read when first asked
    (the spec's YAML only when an archive is downloaded), then kept."""
    import functools

    @functools.cache
    def sources() -> list[str]:
        given = list(channels or [])
        if not given:
            from lorastrap.locking.spec import read_spec
            try:
                given = read_spec(envs_dir / profile.spec).channels
            except LorastrapError:
                given = []
        return [*given, *((list(mirror.values()) if isinstance(mirror, dict) else [mirror]) if mirror else [])]
    return sources


def sources_to_fetch(cache: Cache, entries: list, channels: list[str], mirror, pip_index_url: str,
                     logins) -> list[tuple[str, str, str]]:
    """(URL, sha256, file name) of each entry, for Cache.fetch/fetch_all: source_url for what the cache lacks, the
    lock's own URL for what it holds (never read: no spec, no index page looked up for it)."""
    return [(source_url(e, channels, mirror, pip_index_url, logins) if not cache.is_ready(e.sha256, e.filename)
             else e.url, e.sha256, e.filename) for e in entries]


def source_url(e: lockfile.Entry, channels: list[str], mirror, pip_index_url: str, logins=lambda: []) -> str:
    """Where an entry is fetched from: a conda archive (or a wheel under a lock channel) from --mirror when given;
    a wheel from --pip-index-url when that is not the default and the lock's URL is not already under it (the
    same file, found by name on the index's simple page: the lock's sha256 still decides).  A lock holds no
    login: the one of the URL from LOGINS() (login_sources) the archive's URL lies under goes with it."""
    url = chans.mirrored(e.url, channels, mirror)
    url = chans.logged_in(url, logins())
    if (e.manager == "pip" and url == e.url and pip_index_url != chans.DEFAULT_PIP_INDEX
            and not url.startswith(pip_index_url.rstrip("/") + "/")):
        from lorastrap.install.download import read_timeout
        from lorastrap.locking import pypi_index  # the index's simple page: only for another index
        return pypi_index.file_url(pip_index_url, e.name, e.filename, timeout=read_timeout())
    return url


def _carry_over(old: Path, new: Path, rels: tuple[str, ...], narrate) -> list[str]:
    """Copy the user's things (owned by no package) from the previous environment: files (with their modes and
    times), symbolic links (as links, never followed), empty folders and FIFOs; never over a package's file and
    never through a link: a folder of the new environment on the way that is a symbolic link (a package's) stops
    that path.  What was not carried is listed (it stays in the backup) and returned."""
    copied, skipped = 0, []
    for rel in rels:
        src, dst = old / rel, new / rel
        try:
            st = os.lstat(src)
        except OSError:
            continue
        if _link_on_the_way(new, rel):
            skipped.append(f"{rel} (a link of the new environment is on its way)")
            continue
        if dst.exists() or dst.is_symlink():
            if not (stat.S_ISDIR(st.st_mode) and dst.is_dir() and not dst.is_symlink()):
                skipped.append(f"{rel} (a package's file is there now)")
            continue
        try:
            _make_parents(new, rel)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(src, dst, follow_symlinks=False)
            elif stat.S_ISDIR(st.st_mode):
                dst.mkdir()
                shutil.copystat(src, dst, follow_symlinks=False)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(dst, stat.S_IMODE(st.st_mode))
            else:
                skipped.append(f"{rel} (a socket or device: not copied)")
                continue
        except OSError as exc:
            skipped.append(f"{rel} ({exc.strerror or exc})")
            continue
        copied += 1
    narrate(f"carried over {copied} file(s) no package owns (also kept in the backup)")
    if skipped:
        narrate(f"not carried over ({len(skipped)}; they stay in the backup): " + "; ".join(skipped[:20])
                + (" …" if len(skipped) > 20 else ""))
    return skipped


def user_files_follow(current: Path, target: Path, narrate) -> None:
    """Before TARGET (a kept generation) becomes current again: the user's things in CURRENT (owned by no package)
    go with it — missing ones are carried over, and a file of the user's that TARGET holds in an older state is
    replaced by the current one (the user's work is not part of a generation).  A path a package of TARGET owns is
    never written."""
    owned = pfx.owned_paths(target)
    rels = [r for r in pfx.user_files(current) if r not in owned]
    updated = 0
    for rel in rels:
        src, dst = current / rel, target / rel
        if (src.is_file() and not src.is_symlink() and dst.is_file() and not dst.is_symlink()
                and not _link_on_the_way(target, rel) and not filecmp.cmp(src, dst, shallow=False)):
            tmp = dst.with_name(f".{dst.name}.lorastrap-{os.getpid()}.tmp")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
            updated += 1
    if updated:
        narrate(f"{updated} file(s) of yours updated to their current state in {target}")
    _carry_over(current, target, tuple(r for r in rels if not (target / r).exists() and not (target / r).is_symlink()),
                narrate)


def _link_on_the_way(root: Path, rel: str) -> bool:
    """Whether a folder on the way from ROOT to ROOT/REL is a symbolic link (or not a folder)."""
    here = root
    for part in Path(rel).parts[:-1]:
        here = here / part
        if here.is_symlink() or (here.exists() and not here.is_dir()):
            return True
    return False


def _make_parents(root: Path, rel: str) -> None:
    """mkdir each missing folder on the way to ROOT/REL, one at a time (never through a link: checked before)."""
    here = root
    for part in Path(rel).parts[:-1]:
        here = here / part
        if not here.exists():
            here.mkdir()


def _link_scripts(inspected: dict[str, dict], eng, allow: bool, narrate) -> None:
    """Link scripts (bin/.NAME-post-link.sh and the like): lorastrap's policy is that no package runs code at install.
    A package that carries one is refused by either engine, before anything changes, unless the user allows it
    (--allow-link-scripts); then the embedded engine still never runs them (py-rattler is called with
    execute_link_scripts=False), while micromamba/mamba run them (they have no switch to skip them) — said here."""
    scripts = {name: info["link_scripts"] for name, info in inspected.items() if info["link_scripts"]}
    if not scripts:
        return
    listed = ", ".join(f"{name} ({', '.join(s)})" for name, s in sorted(scripts.items()))
    if not allow:
        name, first = next(iter(sorted(scripts.items())))
        raise UnsafePackageError(f"{len(scripts)} package(s) carry link scripts, e.g. {name}: {first[0]}",
                                 why=f"a link script runs code at install time; lorastrap runs none by default "
                                     f"(all: {listed})",
                                 fix="Nothing was installed. Pass --allow-link-scripts to install them anyway (the "
                                     "embedded engine still skips the scripts; micromamba/mamba run them).")
    if eng.kind == "rattler":
        narrate(f"link scripts allowed but not run (the embedded engine never runs them): {listed}")
    else:
        narrate(f"link scripts allowed: {eng.kind} runs them: {listed}")


def _check_prefix_length(prefix: Path, placeholders: dict[str, int | None]) -> None:
    """Preflight: a binary prefix placeholder holds a prefix no longer than itself (checked before anything moves).
    PLACEHOLDERS: package name → its shortest binary placeholder's length (None: it has none)."""
    shortest = None
    for name, n in placeholders.items():
        if n is not None and (shortest is None or n < shortest[0]):
            shortest = (n, name)
    if shortest and len(str(prefix)) > shortest[0]:
        raise UsageError(f"the prefix is {len(str(prefix))} characters long; {shortest[1]} can be installed only "
                         f"at a prefix of at most {shortest[0]}",
                         why="its binary files hold a placeholder of that length, which is overwritten in place by "
                             "the environment's path", fix="Choose a shorter --prefix. Nothing was changed.")


def _check_disk(where: Path, min_free_mib: int, need_bytes: int, what: str,
                fix_where: str = "point LORASTRAP_PKGS_DIR (or LORASTRAP_HOME) at a larger disk") -> None:
    base = existing_parent(where)
    free = shutil.disk_usage(base).free
    need = need_bytes + min_free_mib * 2**20
    if free < need:
        raise DiskError(f"not enough free disk for {what}: {free / 2**20:.0f} MiB free at {base}, "
                        f"{need / 2**20:.0f} MiB needed", why=f"{need_bytes / 2**20:.0f} MiB for the environment plus "
                                                            f"{min_free_mib} MiB kept free (--min-free-mib)",
                        fix=f"Free space on the disk that holds {base} (mounted at {_mount_of(base)}), or "
                            f"{fix_where}. Nothing was changed.")


def _mount_of(path: Path) -> Path:
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def node_report(result: InstallResult, machine: Machine) -> NodeReport:
    """What a node reports (setup.sh --report, install --report, the fleet report's rows)."""
    versions = {}
    try:
        for e in lockfile.read_lock(Path(result.lock)).for_platform(result.platform):
            if e.name in KEY_PACKAGES:
                versions[e.name] = f"{e.version} ({e.build})" if e.build else e.version
    except LorastrapError:
        pass
    verdict = (result.verify or {}).get("verdict") if result.verify else ("unchanged" if not result.changed else "skipped")
    from lorastrap import __version__
    record = pfx.read_record(Path(result.prefix))
    return NodeReport(host=fsutil.hostname(), ok=True, **result.to_dict(), versions=versions,
                      lorastrap_version=__version__, finished_at=pfx.now(),
                      lock_digest=record.lock_digest if record else None,
                      machine={"platform": machine.platform, "driver": machine.nvidia.driver_version,
                               "driver_cuda": machine.cuda,
                               "gpus": [f"{g.name} (cc {g.compute_capability})" for g in machine.nvidia.gpus]},
                      verify_verdict=verdict)
