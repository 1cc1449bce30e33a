"""The engines that link a locked environment: micromamba / mamba when one is found, else the embedded py-rattler.

Each engine gets a lock whose URLs point at archives lorastrap already checked (see cache.py), and a prefix.
Processes start only through subproc; the user's conda configuration cannot leak in (own root prefix, --no-rc,
CONDA_*/MAMBA_* variables dropped).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorastrap import paths, prefix as pfx, subproc
from lorastrap.errors import DiskError, LorastrapError, UsageError

ENGINE_TIMEOUT_S = 3600


@dataclass
class Engine:
    kind: str  # "micromamba", "mamba" or "rattler"
    exe: str | None = None

    def describe(self) -> str:
        return f"{self.kind} ({self.exe})" if self.exe else "embedded py-rattler"


def _on_path(name: str) -> str | None:
    """shutil.which, skipping pyenv/asdf-style shim folders (a shim is not the program)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and "shims" not in Path(d).parts]
    return shutil.which(name, path=os.pathsep.join(dirs))


def find(choice: str = "auto") -> Engine:
    if choice == "rattler":
        return Engine("rattler")
    candidates: list[tuple[str, str | None]] = []
    if choice in ("auto", "micromamba", "mamba") and os.environ.get("MAMBA_EXE"):
        exe = os.environ["MAMBA_EXE"]
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            raise UsageError(f"MAMBA_EXE={exe!r} is not an executable file",
                             why="it " + ("does not exist" if not os.path.lexists(exe) else
                                          "is a folder" if Path(exe).is_dir() else "cannot be executed"),
                             fix="Point MAMBA_EXE at a micromamba/mamba executable, or unset it (lorastrap then "
                                 "uses one on PATH or its embedded engine).")
        candidates.append(("mamba" if Path(exe).name.startswith("mamba") else "micromamba", exe))
    for kind in (["micromamba", "mamba"] if choice == "auto" else [choice]):
        candidates.append((kind, _on_path(kind)))
        bundled = paths.data_dir() / "bin" / kind  # the copy setup.sh fetched
        candidates.append((kind, str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None))
    for kind, exe in candidates:
        if exe and Path(exe).is_file() and (choice == "auto" or kind == choice):
            return Engine(kind, exe)
    if choice == "auto":
        return Engine("rattler")
    raise UsageError(f"--engine {choice}: no {choice} executable found",
                     why="looked at MAMBA_EXE, PATH (without shims) and the data dir's bin/",
                     fix="Install it, set MAMBA_EXE, or use --engine auto / --engine rattler.")


def mamba_command(engine: Engine, prefix: Path, lock_file: Path, root: Path) -> tuple[list[str], dict[str, str]]:
    """micromamba/mamba 2: `create` from a conda-lock file (its name must end in -lock.yml), isolated from the
    user's configuration."""
    if not lock_file.name.endswith(("-lock.yml", "-lock.yaml")):
        raise ValueError(f"{lock_file.name}: micromamba treats a file as a lock only if it ends in -lock.yml")
    argv = [engine.exe or engine.kind, "create", "--yes", "--no-rc", "--root-prefix", str(root),
            "--prefix", str(prefix), "--file", str(lock_file)]
    env = subproc.clean_env(prefixes=("CONDA_", "MAMBA_"), MAMBA_ROOT_PREFIX=str(root),
                            CONDA_PKGS_DIRS=str(root / "pkgs"))
    return argv, env


class EngineError(LorastrapError):
    pass


def link(engine: Engine, *, prefix: Path, lock_file: Path, platform: str, cache_dir: Path) -> None:
    """Create the environment at prefix from lock_file.  Raises EngineError on failure."""
    if engine.kind == "rattler":
        import sys
        answer = subproc.worker("rattler_worker", {
            "op": "install", "lock": str(lock_file), "platform": platform, "prefix": str(prefix),
            "cache_dir": str(cache_dir)}, timeout=ENGINE_TIMEOUT_S, show_progress=sys.stderr.isatty())
        if not answer.get("ok"):
            _raise_if_disk_full(answer.get("error", ""), prefix)
            raise EngineError(f"the embedded engine could not create {prefix}", why=answer.get("error", "")[:800],
                              fix="Rerun with --debug; if it persists, try --engine micromamba.")
        return
    root = cache_dir / "mamba-root"
    (root / "pkgs").mkdir(parents=True, exist_ok=True)
    argv, env = mamba_command(engine, prefix, lock_file, root)
    res = subproc.run(argv, timeout=ENGINE_TIMEOUT_S, env=env)
    if not res.ok:
        _raise_if_disk_full(res.stdout + res.stderr, prefix)
        raise EngineError(f"{engine.kind} could not create {prefix}", why=res.tail(),
                          fix="See the message above; rerun with --engine rattler to use the embedded engine.")


DISK_FULL = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _raise_if_disk_full(text: str, prefix: Path) -> None:
    """An engine that failed because the disk (or its inodes, or the quota) ran out: say so, not "try another
    engine"."""
    if any(s in text for s in DISK_FULL):
        raise DiskError(f"the disk filled up while linking {prefix}", why=text.strip().splitlines()[-1][:300],
                        fix="Free disk space (or inodes: `df -i`) where the environment goes; the previous "
                            "environment was restored.")


def pip_install(prefix: Path, requirements: list[str], *, timeout: float = 1800) -> None:
    """Install locked pip entries inside the environment: hashes required, no dependency resolution."""
    import sys
    import tempfile
    python = pfx.python_of(prefix) or prefix / "bin" / "python"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="lorastrap-pip-", delete=False) as f:
        f.write("\n".join(requirements) + "\n")
        req = f.name
    try:
        res = subproc.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--isolated",
                           "--no-deps", "--require-hashes", "--no-input", "--disable-pip-version-check",
                           "--no-warn-script-location", "-r", req], timeout=timeout)
    finally:
        os.unlink(req)
    if not res.ok:
        _raise_if_disk_full(res.stdout + res.stderr, prefix)
        raise EngineError("pip could not install the lock's pip entries", why=res.tail(),
                          fix="Check the network to the pip index; a hash mismatch means the wheel changed upstream.")
