"""Step 1: what this machine has.  NVML (in a child process, with a timeout), psutil, and the standard library.

``detect()`` never raises for anything the machine does: every problem becomes a finding, and a machine without a
usable GPU is described as such.  ``build_machine(host, nvml)`` is the pure part — the tests feed it recorded NVML
answers of real machines.
"""

from __future__ import annotations

import json
import os
import re
import platform as _platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lorastrap import subproc, versions
from lorastrap.errors import Finding

SCHEMA_VERSION = 1
NVML_TIMEOUT_S = 20.0

# uname / platform.machine() → conda subdir.  An explicit list: anything else is "unsupported".
CONDA_PLATFORMS = {
    ("linux", "x86_64"): "linux-64", ("linux", "amd64"): "linux-64",
    ("linux", "aarch64"): "linux-aarch64", ("linux", "arm64"): "linux-aarch64",
    ("linux", "ppc64le"): "linux-ppc64le",
    ("darwin", "arm64"): "osx-arm64", ("darwin", "x86_64"): "osx-64",
    ("windows", "amd64"): "win-64", ("windows", "x86_64"): "win-64", ("windows", "arm64"): "win-arm64",
}
OS_NAMES = {"linux": "linux", "darwin": "osx", "windows": "win"}

# What each NVML failure at init means, and what to do.  The names are NVML_ERROR_* (see nvml_probe.py).
NVML_EXPLAINED = {
    "LibraryNotFound": ("no NVIDIA driver library (libnvidia-ml.so.1) was found",
                        "If this machine has an NVIDIA GPU, install the NVIDIA driver; otherwise nothing to do."),
    "DriverNotLoaded": ("the NVIDIA driver is installed but its kernel module is not loaded",
                        "Load it (`sudo modprobe nvidia`) or reboot; check `dmesg | grep -i nvidia`."),
    "NoPermission": ("NVML has no permission to talk to the driver (device nodes /dev/nvidia* not accessible)",
                     "Run as a user with access to /dev/nvidia*, or in a container started with the GPUs passed in."),
    "LibRmVersionMismatch": ("the driver's user-space library and kernel module are different versions "
                             "(\"Driver/library version mismatch\", typical after an unattended driver upgrade)",
                             "Reboot, or reload the module (`sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia "
                             "&& sudo modprobe nvidia`); pin the driver packages to stop unattended upgrades."),
    "OperatingSystem": ("the operating system or a cgroup blocked access to the GPU",
                        "Check the container's device permissions (cgroup device rules) or the OS GPU policy."),
    "NotSupported": ("NVML reported this query as not supported on this device or driver",
                     "Upgrade the NVIDIA driver."),
    "FunctionNotFound": ("the NVIDIA driver is too old for this NVML call",
                         "Upgrade the NVIDIA driver."),
    "GpuIsLost": ("a GPU fell off the bus or stopped responding",
                  "Check `dmesg` for Xid errors; a reset (`nvidia-smi -r`) or reboot is usually needed."),
    "Unknown": ("NVML failed with an unknown error", "Run `nvidia-smi` to see what the driver says."),
    "Timeout": ("the NVML probe did not answer within the time limit (a hung driver?)",
                "Run `nvidia-smi`; if it hangs too, the driver needs a reset or a reboot."),
}


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MigInstance(Model):
    index: int
    uuid: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None


class Mig(Model):
    supported: bool = False
    current: bool = False
    pending: bool = False
    instances: list[MigInstance] = []


class Gpu(Model):
    index: int
    name: str | None = None
    uuid: str | None = None
    compute_capability: str | None = None
    architecture: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    mig: Mig = Mig()
    error: str | None = None


class Device(Model):
    """A CUDA device as a process will see it: a whole GPU, or one MIG instance of it."""
    gpu_index: int
    mig_index: int | None = None
    name: str | None = None
    compute_capability: str | None = None
    memory_total_mib: int | None = None


class Nvidia(Model):
    nvml_status: str = Field(description='"ok", or the NVML error name at init (e.g. "LibraryNotFound", "Timeout")')
    driver_version: str | None = Field(None, description="NVML's (user-space) driver version")
    kernel_module_version: str | None = Field(None, description="/sys/module/nvidia/version or /proc/driver/nvidia/version")
    version_mismatch: bool = False
    cuda_driver_version: str | None = Field(None, description="highest CUDA the driver supports, 'major.minor'")
    gpus: list[Gpu] = []


class Resources(Model):
    cpu_count: int | None = None
    ram_total_mib: int | None = None
    ram_available_mib: int | None = None
    disk_path: str | None = None
    disk_free_mib: int | None = None


class Host(Model):
    """Facts that do not come from NVML.  Recorded fixtures carry their own."""
    system: str = Field(description="platform.system(), lower case: linux, darwin, windows")
    machine: str = Field(description="platform.machine(), lower case (Rosetta-corrected on macOS)")
    glibc: str | None = None
    wsl: bool = False
    container: str | None = None
    kernel_module_version: str | None = None
    kernel: str | None = Field(None, description="the kernel release's numeric part (for __linux)")
    resources: Resources = Resources()


class Machine(Model):
    schema_version: int = SCHEMA_VERSION
    os: str = Field(description="linux, osx, win, or the raw system name")
    platform: str | None = Field(description="conda subdir (linux-64, linux-aarch64, osx-arm64, osx-64, win-64); "
                                             "null when unsupported")
    arch: str
    glibc: str | None = None
    wsl: bool = False
    container: str | None = None
    resources: Resources = Resources()
    nvidia: Nvidia
    devices: list[Device] = Field([], description="CUDA devices as a process sees them (MIG instances expanded)")
    virtual_packages: dict[str, str] = Field(
        description="what a conda solver sees here (__cuda, __cuda_arch, __glibc, __linux/__osx/__win, __unix), "
                    "CONDA_OVERRIDE_* applied")
    overrides: dict[str, str] = Field({}, description="the CONDA_OVERRIDE_* variables that were honoured")
    findings: list[Finding] = []

    @property
    def cuda(self) -> str | None:
        return self.virtual_packages.get("__cuda")

    @property
    def cuda_arch(self) -> str | None:
        return self.virtual_packages.get("__cuda_arch")


# ---------------------------------------------------------------------------------------------------------------
# Host facts (standard library and psutil)

def _read(path: str) -> str | None:
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
    lib, version = _platform.libc_ver()
    return version if lib == "glibc" and version else None


def _machine_name(system: str) -> str:
    machine = _platform.machine().lower()
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
    cgroup = _read("/proc/1/cgroup") or ""
    for name in ("kubepods", "docker", "containerd", "lxc"):
        if name in cgroup:
            return name
    return None


def _kernel_module_version() -> str | None:
    version = _read("/sys/module/nvidia/version")
    if version and version.strip():
        return version.strip()
    text = _read("/proc/driver/nvidia/version") or ""
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.127.05  Tue Oct  8 ..."
    for line in text.splitlines():
        if "Kernel Module" in line:
            parts = line.split("Kernel Module", 1)[1].split()
            if parts:
                return parts[0]
    return None


def existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resources(disk_path: Path) -> Resources:
    try:
        import psutil
    except ImportError:
        return Resources(cpu_count=os.cpu_count())
    res = Resources(cpu_count=psutil.cpu_count(logical=True))
    try:
        vm = psutil.virtual_memory()
        res.ram_total_mib, res.ram_available_mib = vm.total // 2**20, vm.available // 2**20
    except (OSError, RuntimeError):
        pass
    where = existing_parent(disk_path)
    try:
        res.disk_path, res.disk_free_mib = str(where), psutil.disk_usage(str(where)).free // 2**20
    except OSError:
        res.disk_path = str(where)
    return res


def host_facts(disk_path: Path) -> Host:
    system = _platform.system().lower()
    osrelease = (_read("/proc/sys/kernel/osrelease") or "").lower()
    return Host(system=system, machine=_machine_name(system), glibc=_glibc() if system == "linux" else None,
                wsl="microsoft" in osrelease or "wsl" in osrelease, container=_container(),
                kernel_module_version=_kernel_module_version() if system == "linux" else None,
                kernel=re.match(r"[\d.]*", _platform.release()).group(0).strip(".") or None,
                resources=resources(disk_path))


# ---------------------------------------------------------------------------------------------------------------
# NVML, in a child process

def nvml_facts(timeout: float = NVML_TIMEOUT_S) -> dict:
    """Run nvml_probe in a child, without CUDA_VISIBLE_DEVICES; a timeout or a crash becomes an init error."""
    env = subproc.clean_env(drop=("CUDA_VISIBLE_DEVICES",))
    result = subproc.python_module("nvml_probe", timeout=timeout, env=env)
    empty = {"driver_version": None, "cuda_driver_version": None, "gpus": [], "failures": []}
    if result.timed_out:
        return {**empty, "init_error": "Timeout", "init_message": f"no answer within {timeout:.0f} s"}
    try:
        return json.loads(result.stdout)
    except ValueError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**empty, "init_error": "Unknown",
                "init_message": f"the NVML probe exited with {result.returncode}: {tail[0]}"}


# ---------------------------------------------------------------------------------------------------------------
# Putting it together (pure)

def _cuda_str(value: int | None) -> str | None:
    return None if value is None else f"{value // 1000}.{(value % 1000) // 10}"


def _devices(gpus: list[Gpu]) -> list[Device]:
    devices = []
    for gpu in gpus:
        if gpu.error:
            continue
        if gpu.mig.current:  # CUDA enumerates the MIG instances, not the parent GPU
            devices += [Device(gpu_index=gpu.index, mig_index=m.index, name=f"{gpu.name} MIG {m.index}",
                               compute_capability=gpu.compute_capability, memory_total_mib=m.memory_total_mib)
                        for m in gpu.mig.instances]
        else:
            devices.append(Device(gpu_index=gpu.index, name=gpu.name, compute_capability=gpu.compute_capability,
                                  memory_total_mib=gpu.memory_total_mib))
    return devices


def build_machine(host: Host, nvml: dict, environ: dict[str, str] | None = None) -> Machine:
    environ = os.environ if environ is None else environ
    findings: list[Finding] = []
    osname = OS_NAMES.get(host.system, host.system)
    conda_platform = CONDA_PLATFORMS.get((host.system, host.machine))
    if conda_platform is None:
        findings.append(Finding(severity="error", code="unsupported-platform",
                                what=f"{host.system}/{host.machine} has no conda platform lorastrap knows",
                                fix="Use linux-64, linux-aarch64, osx-arm64 or osx-64; on Windows, run lorastrap inside WSL2."))

    status = nvml.get("init_error") or "ok"
    if status != "ok":
        why, fix = NVML_EXPLAINED.get(status, NVML_EXPLAINED["Unknown"])
        severity = "info" if status == "LibraryNotFound" else "warning"
        findings.append(Finding(severity=severity, code=f"nvml-{status}",
                                what=f"NVML: {nvml.get('init_message') or status}; no usable NVIDIA GPU",
                                why=why, fix=fix))
    gpus = [Gpu(**g) for g in nvml.get("gpus", [])]
    for failure in nvml.get("failures", []):
        why, fix = NVML_EXPLAINED.get(failure["error"], NVML_EXPLAINED["Unknown"])
        severity = "warning" if failure["error"] in ("GpuIsLost", "NoPermission", "Unknown") else "info"
        findings.append(Finding(severity=severity, code=f"nvml-{failure['error']}",
                                what=f"{failure['call']} ({failure['what']}) failed: {failure['error']}",
                                why=why, fix=fix))
    if status == "ok" and not gpus:
        findings.append(Finding(severity="warning", code="no-gpus",
                                what="the NVIDIA driver is loaded but reports no GPUs",
                                why="GPUs hidden from this container, unbound from the driver, or absent",
                                fix="Check `nvidia-smi -L` and the container's GPU options (--gpus all)."))
    for gpu in gpus:
        if gpu.mig.pending != gpu.mig.current and gpu.mig.supported:
            findings.append(Finding(severity="info", code="mig-pending",
                                    what=f"GPU {gpu.index}: MIG mode change pending (now {'on' if gpu.mig.current else 'off'})",
                                    why="a MIG mode change takes effect after a GPU reset; the current mode is planned for",
                                    fix="Reset the GPU (`nvidia-smi -r`) or reboot, then run lorastrap again."))
        if gpu.mig.current and not gpu.mig.instances:
            findings.append(Finding(severity="warning", code="mig-no-instances",
                                    what=f"GPU {gpu.index}: MIG is enabled but no MIG instance exists",
                                    why="with MIG on, CUDA sees only MIG instances, so this GPU is unusable",
                                    fix="Create instances (`nvidia-smi mig -cgi ... -C`) or disable MIG."))

    kernel = host.kernel_module_version
    driver = nvml.get("driver_version")
    mismatch = bool(kernel and driver and kernel != driver)
    if mismatch or (status == "LibRmVersionMismatch" and kernel):
        mismatch = True
        findings.append(Finding(severity="warning", code="driver-version-mismatch",
                                what=f"kernel module {kernel} differs from the driver library "
                                     f"{driver or '(newer, unreadable)'}",
                                why=NVML_EXPLAINED["LibRmVersionMismatch"][0],
                                fix=NVML_EXPLAINED["LibRmVersionMismatch"][1]))

    devices = _devices(gpus)
    nvidia = Nvidia(nvml_status=status, driver_version=driver, kernel_module_version=kernel,
                    version_mismatch=mismatch, cuda_driver_version=_cuda_str(nvml.get("cuda_driver_version")),
                    gpus=gpus)

    # Virtual packages, as conda and rattler derive them; then CONDA_OVERRIDE_* (empty value = absent).
    vp: dict[str, str] = {}
    usable = status == "ok" and bool(devices)
    if usable and nvidia.cuda_driver_version:
        vp["__cuda"] = nvidia.cuda_driver_version
        ccs = [d.compute_capability for d in devices if d.compute_capability]
        if ccs:
            vp["__cuda_arch"] = min(ccs, key=versions.key)  # CEP 46: the lowest compute capability
    if host.glibc:
        vp["__glibc"] = host.glibc
    if osname in ("linux", "osx"):
        vp["__unix"] = "0"
    if osname == "linux":
        vp["__linux"] = host.kernel or "0"
    if osname == "win":
        vp["__win"] = "0"
    overrides: dict[str, str] = {}
    for var, name in (("CONDA_OVERRIDE_CUDA", "__cuda"), ("CONDA_OVERRIDE_GLIBC", "__glibc"),
                      ("CONDA_OVERRIDE_CUDA_ARCH", "__cuda_arch")):
        if var in environ:
            overrides[var] = environ[var]
            if environ[var].strip():
                versions.parse(environ[var], var)  # a user's value: refused with what / why / fix
                vp[name] = environ[var].strip()
            else:
                vp.pop(name, None)
    if "__cuda" not in vp:
        vp.pop("__cuda_arch", None)  # CEP 46: absent when __cuda is absent
    if overrides:
        findings.append(Finding(severity="info", code="overrides",
                                what="honouring " + ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items())),
                                why="conda's virtual-package overrides: plan for another machine (e.g. GPU nodes "
                                    "from a login node)"))
    return Machine(os=osname, platform=conda_platform, arch=host.machine,
                   glibc=vp.get("__glibc"), wsl=host.wsl, container=host.container, resources=host.resources,
                   nvidia=nvidia, devices=devices, virtual_packages=vp, overrides=overrides, findings=findings)


def detect(disk_path: Path | None = None, environ: dict[str, str] | None = None,
           nvml_timeout: float = NVML_TIMEOUT_S) -> Machine:
    from lorastrap import paths
    host = host_facts(disk_path or paths.envs_dir())
    return build_machine(host, nvml_facts(nvml_timeout), environ)


def format_table(machine: Machine) -> str:
    nv = machine.nvidia
    rows = [
        ("platform", f"{machine.platform or 'unsupported'} ({machine.os}, {machine.arch})"
                     + (", WSL2" if machine.wsl else "") + (f", container: {machine.container}" if machine.container else "")),
        ("glibc", machine.glibc or "-"),
        ("CPUs / RAM", f"{machine.resources.cpu_count} CPUs, "
                       f"{_gib(machine.resources.ram_available_mib)} of {_gib(machine.resources.ram_total_mib)} GiB free"),
        ("disk", f"{_gib(machine.resources.disk_free_mib)} GiB free at {machine.resources.disk_path}"),
        ("NVML", nv.nvml_status),
        ("driver", (nv.driver_version or "-") + (f" (kernel module {nv.kernel_module_version})"
                                                 if nv.kernel_module_version and nv.version_mismatch else "")),
        ("driver CUDA", nv.cuda_driver_version or "-"),
    ]
    for gpu in nv.gpus:
        mig = ""
        if gpu.mig.current:
            mig = f", MIG on ({len(gpu.mig.instances)} instances)"
        elif gpu.mig.pending:
            mig = ", MIG pending"
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, cc {gpu.compute_capability}, {gpu.architecture}, "
                                         f"{_gib(gpu.memory_total_mib)} GiB{mig}" + (f" [{gpu.error}]" if gpu.error else "")))
    rows.append(("virtual pkgs", " ".join(f"{k}={v}" for k, v in sorted(machine.virtual_packages.items()))))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for f in machine.findings:
        lines.append(f.render())
    return "\n".join(lines)


def _gib(mib: int | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f}"
