"""Ask the CUDA driver (libcuda.so.1) what the machine has.  Runs in a child process (see detect.py), like
nvml_probe: a hung ``cuInit`` can only hang this one.

The calls are the ones conda and rattler use for ``__cuda`` (``cuInit``, ``cuDriverGetVersion``) and, per device,
``cuDeviceGetName``, ``cuDeviceComputeCapability`` and ``cuDeviceTotalMem_v2``.  ``probe(lib)`` takes the loaded
library (a ``ctypes.CDLL``) and returns plain JSON-able facts; it never raises.  Standard library only, so that
the child starts fast.
"""

from __future__ import annotations

import ctypes
import json
import sys

# CUresult codes (cuda.h) that a machine can answer at cuInit; the name is how findings refer to them.
ERROR_NAMES = {
    1: "INVALID_VALUE", 2: "OUT_OF_MEMORY", 3: "NOT_INITIALIZED", 4: "DEINITIALIZED", 34: "STUB_LIBRARY",
    35: "DEVICE_UNAVAILABLE", 100: "NO_DEVICE", 101: "INVALID_DEVICE", 304: "OPERATING_SYSTEM",
    800: "NOT_PERMITTED", 801: "NOT_SUPPORTED", 802: "SYSTEM_NOT_READY", 803: "SYSTEM_DRIVER_MISMATCH",
    804: "COMPAT_NOT_SUPPORTED_ON_DEVICE", 999: "UNKNOWN",
}
MIB = 1024 * 1024


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"ERROR_{code}")


def _empty() -> dict:
    return {"init_error": None, "init_message": "", "cuda_driver_version": None, "devices": [], "failures": []}


def probe(lib) -> dict:
    """cuInit, cuDriverGetVersion and every device's name, compute capability and memory, as plain data."""
    result = _empty()

    def call(name: str, *args, what: str = "") -> bool:
        fn = getattr(lib, name, None)
        if fn is None:
            result["failures"].append({"call": name, "what": what, "error": "FunctionNotFound"})
            return False
        rc = fn(*args)
        if rc != 0:
            result["failures"].append({"call": name, "what": what, "error": error_name(rc)})
        return rc == 0

    cu_init = getattr(lib, "cuInit", None)
    if cu_init is None:
        return {**result, "init_error": "FunctionNotFound", "init_message": "libcuda has no cuInit"}
    rc = cu_init(0)
    if rc != 0:
        return {**result, "init_error": error_name(rc), "init_message": f"cuInit returned {rc}"}
    version = ctypes.c_int(0)
    if call("cuDriverGetVersion", ctypes.byref(version), what="CUDA driver version") and version.value > 0:
        result["cuda_driver_version"] = version.value
    count = ctypes.c_int(0)
    if not call("cuDeviceGetCount", ctypes.byref(count), what="device count"):
        return result
    total_mem = getattr(lib, "cuDeviceTotalMem_v2", None) and "cuDeviceTotalMem_v2" or "cuDeviceTotalMem"
    for i in range(count.value):
        device = ctypes.c_int(0)
        if not call("cuDeviceGet", ctypes.byref(device), i, what=f"device {i}"):
            result["devices"].append({"index": i, "error": result["failures"][-1]["error"]})
            continue
        name = ctypes.create_string_buffer(256)
        major, minor, size = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
        has_name = call("cuDeviceGetName", name, 256, device, what=f"device {i}")
        has_cc = call("cuDeviceComputeCapability", ctypes.byref(major), ctypes.byref(minor), device,
                      what=f"device {i}")
        has_mem = call(total_mem, ctypes.byref(size), device, what=f"device {i}")
        result["devices"].append({
            "index": i,
            "name": name.value.decode(errors="replace") if has_name else None,
            "compute_capability": f"{major.value}.{minor.value}" if has_cc else None,
            "memory_total_mib": size.value // MIB if has_mem and size.value else None,
        })
    return result


def main() -> int:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        answer = {**_empty(), "init_error": "LibraryNotFound", "init_message": str(exc)}
    else:
        answer = probe(lib)
    json.dump(answer, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
