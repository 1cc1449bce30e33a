"""Host facts from the standard library (psutil only off Linux): OS, CPU, glibc, kernel, container, WSL, the NVIDIA kernel
module's version, memory and the free disk where environments go."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lorastrap.core import subproc
from lorastrap.machine.model import Host, Resources


def read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _glibc() -> str | None:
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        value = None
    if value and value.startswith("glibc "):
        return value.split()[1]
    import platform
    lib, version = platform.libc_ver()
    return version if lib == "glibc" and version else None


def uname() -> tuple[str, str, str]:
    """(system, machine, release) as platform.system(), .machine() and .release() answer them, from os.uname():
    the platform module costs ~5 ms of every command's start-up and is imported only where there is no uname
    (Windows)."""
    if hasattr(os, "uname"):
        u = os.uname()
        return u.sysname, u.machine, u.release
    import platform
    return platform.system(), platform.machine(), platform.release()


def _machine_name(system: str) -> str:
    machine = uname()[1].lower()
    if system == "darwin" and machine == "x86_64":  # an x86_64 Python under Rosetta 2 on Apple silicon
        translated = subproc.run(["sysctl", "-n", "sysctl.proc_translated"], timeout=5) if Path(
            "/usr/sbin/sysctl").exists() else None
        if translated is not None and translated.stdout.strip() == "1":
            return "arm64"
    return machine


def _container() -> str | None:
    if Path("/.dockerenv").exists():
        return "docker"
    if Path("/run/.containerenv").exists():
        return "podman"
    if os.environ.get("container"):
        return os.environ["container"]
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    cgroup = read("/proc/1/cgroup") or ""
    for name in ("kubepods", "docker", "containerd", "lxc"):
        if name in cgroup:
            return name
    return None


def _kernel_module_version() -> str | None:
    version = read("/sys/module/nvidia/version")
    if version and version.strip():
        return version.strip()
    text = read("/proc/driver/nvidia/version") or ""
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.127.05  Tue Oct  8 ..."
    for line in text.splitlines():
        if "Kernel Module" in line:
            parts = line.split("Kernel Module", 1)[1].split()
            if parts:
                return parts[0]
    return None


def existing_parent(path: Path) -> Path:
    """The nearest folder of PATH that exists (a name the system refuses, too long say, counts as missing)."""
    path = path.expanduser().absolute()
    while path != path.parent:
        try:
            if path.exists():
                break
        except OSError:
            pass
        path = path.parent
    return path


def _meminfo() -> tuple[int, int] | None:
    """Linux: (MemTotal, MemAvailable) in bytes from /proc/meminfo (what psutil reads), without importing psutil."""
    fields = {}
    for line in (read("/proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable") and rest.split():
            fields[name] = int(rest.split()[0]) * 1024
    return (fields["MemTotal"], fields["MemAvailable"]) if len(fields) == 2 else None


def _ram() -> tuple[int, int] | None:
    mem = _meminfo() if sys.platform.startswith("linux") else None
    if mem is None:
        try:
            import psutil
            vm = psutil.virtual_memory()
            mem = vm.total, vm.available
        except (ImportError, OSError, RuntimeError):
            return None
    return mem


def resources(disk_path: Path) -> Resources:
    res = Resources(cpu_count=os.cpu_count())
    ram = _ram()
    if ram:
        res.ram_total_mib, res.ram_available_mib = ram[0] // 2**20, ram[1] // 2**20
    where = existing_parent(disk_path)
    try:
        st = os.statvfs(where)  # psutil.disk_usage's free: blocks available to unprivileged users
        res.disk_path, res.disk_free_mib = str(where), st.f_bavail * st.f_frsize // 2**20
    except OSError:
        res.disk_path = str(where)
    return res


def host_facts(disk_path: Path) -> Host:
    system, _, release = uname()
    system = system.lower()
    osrelease = (read("/proc/sys/kernel/osrelease") or "").lower()
    return Host(system=system, machine=_machine_name(system), glibc=_glibc() if system == "linux" else None,
                wsl="microsoft" in osrelease or "wsl" in osrelease, container=_container(),
                kernel_module_version=_kernel_module_version() if system == "linux" else None,
                kernel=re.match(r"[\d.]*", release).group(0).strip(".") or None,
                resources=resources(disk_path))
