"""``lorastrap detect`` without --json: the machine as a table for a person."""

from __future__ import annotations

from lorastrap.machine.model import Machine


def summary(machine: Machine) -> dict:
    """The machine as reports carry it (also on failure): platform, driver, the CUDA it supports, every GPU."""
    return {"platform": machine.platform, "driver": machine.nvidia.driver_version, "driver_cuda": machine.cuda,
            "gpus": [f"{g.name} (cc {g.compute_capability})" for g in machine.nvidia.gpus]}


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
        ("libcuda", nv.cuda_status),
        ("GPU found by", nv.answered_by or "-"),
        ("driver", (nv.driver_version or "-") + (f" (kernel module {nv.kernel_module_version})"
                                                 if nv.kernel_module_version and nv.version_mismatch else "")),
        ("driver CUDA", nv.cuda_driver_version or "-"),
    ]
    if nv.jetson:
        rows.append(("Jetson", f"{nv.jetson.model or '?'}, L4T {nv.jetson.l4t or '?'}"
                               + (f", JetPack {nv.jetson.jetpack}, CUDA {nv.jetson.cuda}" if nv.jetson.cuda else "")))
    for gpu in nv.gpus:
        mig = ""
        if gpu.mig.current:
            mig = f", MIG on ({len(gpu.mig.instances)} instances)"
        elif gpu.mig.pending:
            mig = ", MIG pending"
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, cc {gpu.compute_capability}, "
                                         + (f"{gpu.architecture}, " if gpu.architecture else "") +
                                         f"{_gib(gpu.memory_total_mib)} GiB{mig}" + (f" [{gpu.error}]" if gpu.error else "")))
    rows.append(("virtual pkgs", " ".join(f"{k}={v}" for k, v in sorted(machine.virtual_packages.items()))))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for f in machine.findings:
        lines.append(f.render())
    return "\n".join(lines)


def _gib(mib: int | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f}"
