"""Step 1: what this machine has.  The GPU probes, in order: NVML, then libcuda (each in a child process with a
timeout, started only when its library can be found), then the Jetson/Tegra release files; psutil and the standard
library for the rest.

``detect()`` never raises for anything the machine does: every problem becomes a finding, and a machine without a
usable GPU is described as such.  ``build_machine(host, nvml, cuda=..., tegra=...)`` is the pure part — the tests
feed it recorded answers of real machines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorastrap.core import subproc
from lorastrap.core.errors import Finding
from lorastrap.machine import jetson, libfind, platforms, virtual
from lorastrap.machine.host import host_facts
from lorastrap.machine.model import NOT_RUN, Device, Gpu, Host, Machine, Nvidia, Probe

NVML_TIMEOUT_S = 20.0
NVML_LIBRARY, CUDA_LIBRARY = "libnvidia-ml.so.1", "libcuda.so.1"

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


# What each libcuda failure at cuInit means (CUresult names, see cuda_probe.py), and what to do.
CUDA_EXPLAINED = {
    "NO_DEVICE": ("the CUDA driver sees no CUDA-capable device (kernel module not loaded, /dev/nvidia* not "
                  "accessible, or no GPU passed into this container)",
                  "Check `nvidia-smi`; in a container, start it with the GPUs (--gpus all)."),
    "SYSTEM_DRIVER_MISMATCH": ("libcuda and the kernel module are different driver versions (typical after an "
                               "unattended driver upgrade)", NVML_EXPLAINED["LibRmVersionMismatch"][1]),
    "STUB_LIBRARY": ("the libcuda.so.1 found is the CUDA toolkit's link-time stub (lib64/stubs), not the driver's",
                     "Remove the toolkit's stubs folder from LD_LIBRARY_PATH."),
    "COMPAT_NOT_SUPPORTED_ON_DEVICE": ("a CUDA forward-compatibility libcuda (cuda-compat) is loaded on a GPU that "
                                       "does not support forward compatibility",
                                       "Remove the cuda-compat folder from LD_LIBRARY_PATH, or upgrade the driver."),
    "NOT_PERMITTED": ("the CUDA driver refused this process", "Check the device permissions of /dev/nvidia*."),
    "OPERATING_SYSTEM": ("the operating system refused a CUDA driver call",
                         "Check the container's device permissions (cgroup device rules)."),
    "Timeout": ("the libcuda probe did not answer within the time limit (cuInit hung: a hung driver?)",
                "Run `nvidia-smi`; if it hangs too, the driver needs a reset or a reboot."),
    "Unknown": ("the CUDA driver failed with an unexpected error", "Run `nvidia-smi` to see what the driver says."),
}


# ---------------------------------------------------------------------------------------------------------------
# Host facts (standard library and psutil)

# ---------------------------------------------------------------------------------------------------------------
# The GPU probes: NVML and libcuda in child processes, the Jetson release files read here

def _child_answer(result: subproc.Result, timeout: float, what: str, empty: dict) -> dict:
    """A probe child's JSON answer; a timeout or a crash becomes an init error."""
    if result.timed_out:
        return {**empty, "init_error": "Timeout", "init_message": f"no answer within {timeout:.0f} s"}
    try:
        return json.loads(result.stdout)
    except ValueError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**empty, "init_error": "Unknown",
                "init_message": f"the {what} probe exited with {result.returncode}: {tail[0]}"}


_EMPTY = {"nvml_probe": {"driver_version": None, "cuda_driver_version": None, "gpus": [], "failures": []},
          "cuda_probe": {"cuda_driver_version": None, "devices": [], "failures": []}}


def _probe_env(found: libfind.Found | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment (``environ``, default ours): no CUDA_VISIBLE_DEVICES (it hides GPUs from libcuda),
    and the library's folder on LD_LIBRARY_PATH when the loader would not search it by itself (/usr/lib/wsl/lib)."""
    if environ is None:
        env = subproc.clean_env(drop=("CUDA_VISIBLE_DEVICES",))
    else:
        env = {k: v for k, v in environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if found is not None and not found.loader_finds_it:
        folder = os.path.dirname(found.path)
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [folder, env.get("LD_LIBRARY_PATH", "")]))
    return env


def nvml_facts(timeout: float = NVML_TIMEOUT_S) -> dict:
    """Run nvml_probe in a child, without CUDA_VISIBLE_DEVICES, whether or not its library can be found."""
    result = subproc.python_module("machine.nvml_probe", timeout=timeout, env=_probe_env(None))
    return _child_answer(result, timeout, "NVML", _EMPTY["nvml_probe"])


def gpu_facts(*, wsl: bool = False, environ: dict[str, str] | None = None, root: Path = Path("/"),
              timeout: float = NVML_TIMEOUT_S) -> dict:
    """NVML and libcuda (children, at once, each with ``timeout``; none for a library the loader cannot find) and the
    Jetson release files.  ``root`` is the filesystem the libraries and files are looked for under."""
    environ = os.environ if environ is None else environ
    answers, calls = {}, []
    for key, module, soname in (("nvml", "nvml_probe", NVML_LIBRARY), ("cuda", "cuda_probe", CUDA_LIBRARY)):
        found = libfind.find(soname, environ=environ, root=root, wsl=wsl)
        if found is None:
            dirs = ", ".join(str(d) for d in libfind.search_dirs(root, wsl=wsl)[1])
            answers[key] = {**_EMPTY[module], "init_error": "LibraryNotFound",
                            "init_message": f"{soname} not found (LD_LIBRARY_PATH, /etc/ld.so.cache, the default "
                                            f"directories, {dirs})", "library": None}
        else:
            answers[key] = {"library": f"{found.path} ({found.via})"}
            calls.append((key, module, found))
    results = subproc.python_modules([(f"machine.{module}", _probe_env(found, dict(environ)))
                                      for _, module, found in calls], timeout=timeout)
    for (key, module, _), result in zip(calls, results):
        answers[key] = {**_child_answer(result, timeout, module.split("_")[0], _EMPTY[module]), **answers[key]}
    answers["tegra"] = jetson.tegra_facts(root)
    return answers


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


def _nvml_findings(nvml: dict, status: str, gpu_elsewhere: bool) -> list[Finding]:
    findings = []
    if status != "ok":
        why, fix = NVML_EXPLAINED.get(status, NVML_EXPLAINED["Unknown"])
        if gpu_elsewhere and status == "LibraryNotFound":
            findings.append(Finding(
                severity="info", code="nvml-missing-libcuda-works",
                what="NVML (libnvidia-ml.so.1) is missing, but libcuda answered: the GPU was found through the CUDA "
                     "driver API",
                why="a container given only the 'compute' driver capability mounts libcuda without NVML; Jetson "
                    "boards before JetPack 6 have no NVML at all",
                fix="Nothing is needed for lorastrap (it uses libcuda's answer, as conda does). For nvidia-smi and "
                    "NVML tools, start the container with NVIDIA_DRIVER_CAPABILITIES=compute,utility."))
        elif gpu_elsewhere:
            findings.append(Finding(severity="warning", code=f"nvml-{status}",
                                    what=f"NVML: {nvml.get('init_message') or status}; the GPU was found through "
                                         f"libcuda instead", why=why, fix=fix))
        else:
            findings.append(Finding(severity="info" if status == "LibraryNotFound" else "warning",
                                    code=f"nvml-{status}",
                                    what=f"NVML: {nvml.get('init_message') or status}; no usable NVIDIA GPU",
                                    why=why, fix=fix))
    for failure in nvml.get("failures", []):
        why, fix = NVML_EXPLAINED.get(failure["error"], NVML_EXPLAINED["Unknown"])
        severity = "warning" if failure["error"] in ("GpuIsLost", "NoPermission", "Unknown") else "info"
        findings.append(Finding(severity=severity, code=f"nvml-{failure['error']}",
                                what=f"{failure['call']} ({failure['what']}) failed: {failure['error']}",
                                why=why, fix=fix))
    return findings


def _cuda_findings(cuda: dict | None, cuda_status: str, nvml_status: str, nvml_gpus: int) -> list[Finding]:
    if cuda is None or cuda_status == "ok":
        return []
    if cuda_status == "LibraryNotFound":
        if nvml_status != "ok" or not nvml_gpus:
            return []
        return [Finding(severity="warning", code="nvml-without-libcuda",
                        what="NVML sees the GPUs, but libcuda.so.1 was not found: CUDA programs (PyTorch) cannot "
                             "use them", why="the driver's CUDA library is not installed, or a container was given "
                                             "only the 'utility' driver capability",
                        fix="Install the driver's CUDA library (libnvidia-compute / libcuda1 for your driver), or "
                            "start the container with NVIDIA_DRIVER_CAPABILITIES=compute,utility.")]
    why, fix = CUDA_EXPLAINED.get(cuda_status, CUDA_EXPLAINED["Unknown"])
    return [Finding(severity="warning", code=f"cuda-{cuda_status}",
                    what=f"libcuda: {cuda.get('init_message') or cuda_status}"
                         + ("" if nvml_status == "ok" else "; no usable NVIDIA GPU"), why=why, fix=fix)]


def _gpus_from_cuda(cuda: dict) -> list[Gpu]:
    return [Gpu(index=d["index"], name=d.get("name"), compute_capability=d.get("compute_capability"),
                memory_total_mib=d.get("memory_total_mib"), error=d.get("error"))
            for d in cuda.get("devices", [])]


def _probe(name, raw: dict | None, status: str, version: str | None, devices: int) -> Probe:
    raw = raw or {}
    return Probe(name=name, status=status, library=raw.get("library"), cuda_driver_version=version,
                 devices=devices, message=raw.get("init_message") or "")


def build_machine(host: Host, nvml: dict, environ: dict[str, str] | None = None, *, cuda: dict | None = None,
                  tegra: dict | None = None, jetson_rows: list[dict] | None = None) -> Machine:
    """The machine from the probes' answers (pure).  ``cuda`` None: libcuda was not asked; ``tegra`` None: no
    Jetson release files."""
    environ = os.environ if environ is None else environ
    findings: list[Finding] = []
    osname = platforms.OS_NAMES.get(host.system, host.system)
    known = platforms.for_host(host.system, host.machine)
    conda_platform = known.subdir if known else None
    if conda_platform is None:
        findings.append(Finding(severity="error", code="unsupported-platform",
                                what=f"{host.system}/{host.machine} has no conda platform lorastrap knows",
                                fix="Use linux-64, linux-aarch64, osx-arm64 or osx-64; on Windows, run lorastrap inside WSL2."))

    # The probes in order: NVML, then libcuda, then the Jetson files.  The first that answers describes the GPUs.
    status = nvml.get("init_error") or "ok"
    cuda_status = NOT_RUN if cuda is None else (cuda.get("init_error") or "ok")
    nvml_gpus = [Gpu(**g) for g in nvml.get("gpus", [])] if status == "ok" else []
    cuda_gpus = _gpus_from_cuda(cuda) if cuda_status == "ok" else []
    nvml_cuda = _cuda_str(nvml.get("cuda_driver_version")) if status == "ok" else None
    lib_cuda = _cuda_str(cuda.get("cuda_driver_version")) if cuda_status == "ok" else None
    board = jetson.board(tegra, jetson.table() if jetson_rows is None else jetson_rows) if tegra else None
    if status == "ok":
        answered_by, gpus = "nvml", nvml_gpus
    elif cuda_status == "ok":
        answered_by, gpus = "libcuda", cuda_gpus
    else:
        answered_by, gpus = ("tegra" if board else None), []
    # __cuda as rattler (and so pixi) derives it: NVML's answer, else libcuda's (cuInit + cuDriverGetVersion).
    driver_cuda = nvml_cuda or lib_cuda

    findings += _nvml_findings(nvml, status, gpu_elsewhere=answered_by == "libcuda")
    findings += _cuda_findings(cuda, cuda_status, status, len(nvml_gpus))
    if nvml_cuda and lib_cuda and nvml_cuda != lib_cuda:
        findings.append(Finding(severity="warning", code="cuda-version-disagreement",
                                what=f"NVML says the driver supports CUDA {nvml_cuda}, libcuda says {lib_cuda}",
                                why="two drivers' libraries are visible: a CUDA forward-compatibility libcuda "
                                    "(cuda-compat) or a container's own copy on the loader path",
                                fix="Check `ldconfig -p | grep libcuda` and LD_LIBRARY_PATH. lorastrap plans with "
                                    "NVML's answer, as conda's solver (rattler) does."))
    if board:
        findings.append(jetson.finding(board, gpu_found=answered_by in ("nvml", "libcuda")))
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
    if mismatch or (kernel and (status == "LibRmVersionMismatch" or cuda_status == "SYSTEM_DRIVER_MISMATCH")):
        mismatch = True
        findings.append(Finding(severity="warning", code="driver-version-mismatch",
                                what=f"kernel module {kernel} differs from the driver library "
                                     f"{driver or '(newer, unreadable)'}",
                                why=NVML_EXPLAINED["LibRmVersionMismatch"][0],
                                fix=NVML_EXPLAINED["LibRmVersionMismatch"][1]))

    devices = _devices(gpus)
    probes = [_probe("nvml", nvml, status, nvml_cuda, len(nvml_gpus)),
              _probe("libcuda", cuda, cuda_status, lib_cuda, len(cuda_gpus)),
              Probe(name="tegra", status="ok" if board else "LibraryNotFound",
                    library="/etc/nv_tegra_release" if board else None,
                    cuda_driver_version=board.cuda if board else None,
                    message="" if board else "no /etc/nv_tegra_release (not a Jetson)")]
    nvidia = Nvidia(nvml_status=status, cuda_status=cuda_status, answered_by=answered_by, probes=probes,
                    jetson=board, driver_version=driver, kernel_module_version=kernel, version_mismatch=mismatch,
                    cuda_driver_version=driver_cuda, gpus=gpus)

    # Virtual packages, as conda and rattler derive them; then CONDA_OVERRIDE_* above all probes.
    vp, overrides = virtual.derive(osname, host, driver_cuda, devices, environ)
    if overrides:
        findings.append(Finding(severity="info", code="overrides",
                                what="honouring " + ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items())),
                                why="conda's virtual-package overrides: plan for another machine (e.g. GPU nodes "
                                    "from a login node)"))
    return Machine(os=osname, platform=conda_platform, arch=host.machine,
                   glibc=vp.get("__glibc"), wsl=host.wsl, container=host.container, resources=host.resources,
                   nvidia=nvidia, devices=devices, virtual_packages=vp, overrides=overrides, findings=findings)


def detect(disk_path: Path | None = None, environ: dict[str, str] | None = None,
           nvml_timeout: float = NVML_TIMEOUT_S, root: Path = Path("/")) -> Machine:
    from lorastrap.core import paths
    host = host_facts(disk_path or paths.envs_dir())
    facts = gpu_facts(wsl=host.wsl, environ=environ, root=root, timeout=nvml_timeout)
    return build_machine(host, facts["nvml"], environ, cuda=facts["cuda"], tegra=facts["tegra"])


