"""What ``detect`` says about a machine: the records of its answer (``Machine`` and its parts), plain dataclasses
(core/plain.py: detect never imports pydantic; reading one validates it), whose JSON schema is committed as
envs/schemas/machine.schema.json."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from lorastrap.core.errors import Finding
from lorastrap.core.plain import Field, Plain, record

SCHEMA_VERSION = 1
NOT_RUN = "not-run"  # a probe not started (its library was not found, or an earlier one answered)


Model = Plain


@record
class MigInstance(Model):
    index: int
    uuid: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None


@record
class Mig(Model):
    supported: bool = False
    current: bool = False
    pending: bool = False
    instances: list[MigInstance] = field(default_factory=list)


@record
class Gpu(Model):
    index: int
    name: str | None = None
    uuid: str | None = None
    compute_capability: str | None = None
    architecture: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    mig: Mig = field(default_factory=Mig)
    error: str | None = None


@record
class Device(Model):
    """A CUDA device as a process will see it: a whole GPU, or one MIG instance of it."""
    gpu_index: int
    mig_index: int | None = None
    name: str | None = None
    compute_capability: str | None = None
    memory_total_mib: int | None = None


@record
class Probe(Model):
    """What one GPU probe said."""
    name: Literal["nvml", "libcuda", "tegra"]
    status: str = Field(description='"ok"; "LibraryNotFound" (not even started); "not-run"; "Timeout"; or the '
                                    "error at init (NVML_ERROR_* or CUDA_ERROR_* name)")
    library: str | None = Field(None, description="the library file the search found, and how (LD_LIBRARY_PATH, "
                                                  "ld.so.cache, default directory, extra directory)")
    cuda_driver_version: str | None = None
    devices: int = 0
    message: str = ""


@record
class Jetson(Model):
    model: str | None = Field(None, description="/proc/device-tree/model")
    l4t: str | None = Field(None, description="the Jetson Linux (L4T) release, from /etc/nv_tegra_release")
    jetpack: str | None = None
    cuda: str | None = Field(None, description="the CUDA that L4T release ships (envs/jetson.yaml)")
    source: str | None = None


@record
class Nvidia(Model):
    nvml_status: str = Field(description='"ok", or the NVML error name at init (e.g. "LibraryNotFound", "Timeout")')
    cuda_status: str = Field(NOT_RUN, description='libcuda: "ok", "not-run", or the CUDA error name at cuInit')
    answered_by: Literal["nvml", "libcuda", "tegra"] | None = Field(
        None, description="the first probe (in the order nvml, libcuda, tegra) that found the GPU")
    probes: list[Probe] = field(default_factory=list, metadata={"description": "what each probe said"})
    jetson: Jetson | None = None
    driver_version: str | None = Field(None, description="NVML's (user-space) driver version")
    kernel_module_version: str | None = Field(None, description="/sys/module/nvidia/version or /proc/driver/nvidia/version")
    version_mismatch: bool = False
    cuda_driver_version: str | None = Field(None, description="highest CUDA the driver supports, 'major.minor'")
    gpus: list[Gpu] = field(default_factory=list)


@record
class Resources(Model):
    cpu_count: int | None = None
    ram_total_mib: int | None = None
    ram_available_mib: int | None = None
    disk_path: str | None = None
    disk_free_mib: int | None = None


@record
class Host(Model):
    """Facts that do not come from NVML.  Recorded fixtures carry their own."""
    system: str = Field(description="platform.system(), lower case: linux, darwin, windows")
    machine: str = Field(description="platform.machine(), lower case (Rosetta-corrected on macOS)")
    glibc: str | None = None
    wsl: bool = False
    container: str | None = None
    kernel_module_version: str | None = None
    kernel: str | None = Field(None, description="the kernel release's numeric part (for __linux)")
    resources: Resources = field(default_factory=Resources)


@record
class Machine(Model):
    schema_version: int = SCHEMA_VERSION
    os: str = Field(description="linux, osx, win, or the raw system name")
    platform: str | None = Field(description="conda subdir (linux-64, linux-aarch64, osx-arm64, osx-64, win-64); "
                                             "null when unsupported")
    arch: str
    glibc: str | None = None
    wsl: bool = False
    container: str | None = None
    resources: Resources = field(default_factory=Resources)
    nvidia: Nvidia
    devices: list[Device] = field(default_factory=list, metadata={"description":"CUDA devices as a process sees them (MIG instances expanded)"})
    virtual_packages: dict[str, str] = Field(
        description="what a conda solver sees here (__cuda, __cuda_arch, __glibc, __linux/__osx/__win, __unix), "
                    "CONDA_OVERRIDE_* applied")
    overrides: dict[str, str] = field(default_factory=dict, metadata={"description": "the CONDA_OVERRIDE_* variables that were honoured"})
    findings: list[Finding] = field(default_factory=list)

    @property
    def cuda(self) -> str | None:
        return self.virtual_packages.get("__cuda")

    @property
    def cuda_arch(self) -> str | None:
        return self.virtual_packages.get("__cuda_arch")
