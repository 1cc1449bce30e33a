"""Ask NVML what the machine has.  Runs in a child process (see detect.py): a hung driver can only hang this one.

``probe(nvml)`` takes the NVML module (nvidia-ml-py's ``pynvml``) or anything that answers like it — the tests
pass recorded answers of real machines here, and only here.  It returns plain JSON-able facts: what NVML said, and
for every call that failed, the NVML error's name.  It never raises.

Kept free of pydantic and of the rest of the package so that the child starts fast.
"""

from __future__ import annotations

import json
import sys

ARCHITECTURES = {  # NVML_DEVICE_ARCH_* (nvidia-ml-py pynvml.py)
    2: "kepler", 3: "maxwell", 4: "pascal", 5: "volta", 6: "turing", 7: "ampere", 8: "ada",
    9: "hopper", 10: "blackwell", 13: "rubin",
}

ERROR_NAMES = {  # NVML_ERROR_* codes (nvidia-ml-py pynvml.py); the name is how findings refer to them
    1: "Uninitialized", 2: "InvalidArgument", 3: "NotSupported", 4: "NoPermission", 6: "NotFound",
    9: "DriverNotLoaded", 10: "Timeout", 12: "LibraryNotFound", 13: "FunctionNotFound", 15: "GpuIsLost",
    16: "ResetRequired", 17: "OperatingSystem", 18: "LibRmVersionMismatch", 20: "Memory", 28: "GpuNotFound",
    999: "Unknown",
}

MIB = 1024 * 1024


def error_name(exc: BaseException) -> str:
    code = getattr(exc, "value", None)
    if isinstance(code, int):
        return ERROR_NAMES.get(code, f"Error{code}")
    return type(exc).__name__


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Calls:
    """Calls NVML functions, turning an NVMLError into a recorded failure instead of an exception."""

    def __init__(self, nvml):
        self.nvml = nvml
        self.failures: list[dict] = []

    def __call__(self, fn_name: str, *args, what: str = ""):
        try:
            return getattr(self.nvml, fn_name)(*args), None
        except Exception as exc:  # NVMLError subclasses, or AttributeError for a missing binding
            name = error_name(exc) if hasattr(exc, "value") else "FunctionNotFound"
            self.failures.append({"call": fn_name, "what": what, "error": name, "message": _text(exc)})
            return None, name


def _memory(calls: _Calls, handle, what: str) -> tuple[int | None, int | None]:
    mem, _ = calls("nvmlDeviceGetMemoryInfo", handle, what=what)
    if mem is None:
        return None, None
    return int(mem.total) // MIB, int(mem.free) // MIB


def _mig(calls: _Calls, handle, index: int) -> dict:
    modes, err = calls("nvmlDeviceGetMigMode", handle, what=f"GPU {index}")
    if modes is None:  # NotSupported on GPUs without MIG (pre-Ampere, consumer cards)
        return {"supported": False, "current": False, "pending": False, "instances": []}
    current, pending = (bool(m) for m in modes)
    instances = []
    if current:
        count, _ = calls("nvmlDeviceGetMaxMigDeviceCount", handle, what=f"GPU {index}")
        for k in range(count or 0):
            mig, err = calls("nvmlDeviceGetMigDeviceHandleByIndex", handle, k, what=f"GPU {index} MIG {k}")
            if mig is None:  # NotFound: that slot holds no instance
                continue
            uuid, _ = calls("nvmlDeviceGetUUID", mig, what=f"GPU {index} MIG {k}")
            total, free = _memory(calls, mig, f"GPU {index} MIG {k}")
            instances.append({"index": k, "uuid": _text(uuid) if uuid else None,
                              "memory_total_mib": total, "memory_free_mib": free})
    return {"supported": True, "current": current, "pending": pending, "instances": instances}


def probe(nvml) -> dict:
    """Everything NVML tells about this machine, as plain data."""
    calls = _Calls(nvml)
    result: dict = {"init_error": None, "driver_version": None, "cuda_driver_version": None,
                    "cuda_version_call": None, "gpus": [], "failures": calls.failures}
    try:
        nvml.nvmlInit()
    except Exception as exc:
        result["init_error"] = error_name(exc) if hasattr(exc, "value") else "LibraryNotFound"
        result["init_message"] = _text(exc)
        return result
    try:
        driver, _ = calls("nvmlSystemGetDriverVersion", what="driver")
        result["driver_version"] = _text(driver) if driver is not None else None
        # v2 asks libcuda itself; v1 may answer "a known supported version" when libcuda is missing (NVML docs).
        # v1 only where the driver has no v2 (as rattler does): v2 failing otherwise means libcuda is missing.
        for fn in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
            version, err = calls(fn, what="CUDA driver version")
            if version is not None:
                result["cuda_driver_version"] = int(version)
                result["cuda_version_call"] = fn
            if err != "FunctionNotFound":
                break
        count, _ = calls("nvmlDeviceGetCount", what="GPU count")
        for i in range(count or 0):
            handle, err = calls("nvmlDeviceGetHandleByIndex", i, what=f"GPU {i}")
            if handle is None:
                result["gpus"].append({"index": i, "error": err})
                continue
            try:
                result["gpus"].append(_gpu(calls, handle, i))
            except Exception as exc:  # an answer of a shape nobody expected: keep going, say so
                calls.failures.append({"call": "device query", "what": f"GPU {i}", "error": "Unknown",
                                       "message": repr(exc)})
                result["gpus"].append({"index": i, "error": "Unknown"})
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return result


def _gpu(calls: _Calls, handle, i: int) -> dict:
    name, _ = calls("nvmlDeviceGetName", handle, what=f"GPU {i}")
    uuid, _ = calls("nvmlDeviceGetUUID", handle, what=f"GPU {i}")
    cc, err_cc = calls("nvmlDeviceGetCudaComputeCapability", handle, what=f"GPU {i}")
    arch, _ = calls("nvmlDeviceGetArchitecture", handle, what=f"GPU {i}")
    total, free = _memory(calls, handle, f"GPU {i}")
    return {
        "index": i,
        "name": _text(name) if name is not None else None,
        "uuid": _text(uuid) if uuid is not None else None,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc is not None else None,
        "architecture": ARCHITECTURES.get(arch, "unknown") if arch is not None else None,
        "memory_total_mib": total,
        "memory_free_mib": free,
        "mig": _mig(calls, handle, i),
        "error": err_cc if err_cc == "GpuIsLost" else None,
    }


def main() -> int:
    try:
        import pynvml
    except ImportError:
        json.dump({"init_error": "LibraryNotFound", "init_message": "nvidia-ml-py (pynvml) is not installed",
                   "driver_version": None, "cuda_driver_version": None, "gpus": [], "failures": []}, sys.stdout)
        return 0
    json.dump(probe(pynvml), sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
