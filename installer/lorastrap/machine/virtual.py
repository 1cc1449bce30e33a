"""The virtual packages of a machine as conda and rattler derive them (__cuda from the driver, __cuda_arch the
lowest compute capability (CEP 46), __glibc, __unix, __linux, __win), then conda's CONDA_OVERRIDE_* variables above
all probes (an empty value removes the package)."""

from __future__ import annotations

from lorastrap.core import versions
from lorastrap.machine.model import Device, Host

OVERRIDES = (("CONDA_OVERRIDE_CUDA", "__cuda"), ("CONDA_OVERRIDE_GLIBC", "__glibc"),
             ("CONDA_OVERRIDE_CUDA_ARCH", "__cuda_arch"))


def derive(osname: str, host: Host, driver_cuda: str | None, devices: list[Device],
           environ: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(virtual packages, the CONDA_OVERRIDE_* variables honoured).  A user's override that is not a version is
    refused with what / why / fix (UsageError)."""
    vp: dict[str, str] = {}
    if driver_cuda:
        vp["__cuda"] = driver_cuda
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
    for var, name in OVERRIDES:
        if var in environ:
            overrides[var] = environ[var]
            if environ[var].strip():
                versions.parse(environ[var], var)  # a user's value: refused with what / why / fix
                vp[name] = environ[var].strip()
            else:
                vp.pop(name, None)
    if "__cuda" not in vp:
        vp.pop("__cuda_arch", None)  # CEP 46: absent when __cuda is absent
    return vp, overrides
