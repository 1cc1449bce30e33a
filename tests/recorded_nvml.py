"""Recorded NVML answers of real machines: the one fake in the test suite, at the hardware boundary.

A fixture (tests/fixtures/nvml/*.json) says what each NVML call answered on a machine; RecordedNVML replays it
with nvidia-ml-py's own error classes, so lorastrap.machine.nvml_probe.probe runs unchanged against it.  A value given as
{"error": "Name"} raises NVMLError with that NVML_ERROR_* code.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pynvml

from lorastrap.machine.nvml_probe import ERROR_NAMES

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
CODES = {name: code for code, name in ERROR_NAMES.items()}


def _answer(value):
    if isinstance(value, dict) and set(value) == {"error"}:
        raise pynvml.NVMLError(CODES[value["error"]])
    return value


class RecordedNVML:
    def __init__(self, nvml: dict):
        self.rec = nvml
        self.calls: list[str] = []

    def _dev(self, handle):
        return self.rec["devices"][handle[1]] if handle[0] == "gpu" else self.rec["devices"][handle[1]]["mig_devices"][handle[2]]

    def nvmlInit(self):
        self.calls.append("nvmlInit")
        _answer(self.rec.get("init", None))

    def nvmlShutdown(self):
        self.calls.append("nvmlShutdown")

    def nvmlSystemGetDriverVersion(self):
        return _answer(self.rec["driver_version"])

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return _answer(self.rec.get("cuda_driver_version_v2", self.rec.get("cuda_driver_version")))

    def nvmlSystemGetCudaDriverVersion(self):
        return _answer(self.rec.get("cuda_driver_version"))

    def nvmlDeviceGetCount(self):
        return _answer(self.rec.get("device_count", len(self.rec.get("devices", []))))

    def nvmlDeviceGetHandleByIndex(self, i):
        _answer(self.rec["devices"][i].get("handle"))
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return _answer(self._dev(h)["name"])

    def nvmlDeviceGetUUID(self, h):
        return _answer(self._dev(h)["uuid"])

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return tuple(_answer(self._dev(h)["cc"]))

    def nvmlDeviceGetArchitecture(self, h):
        return _answer(self._dev(h).get("arch", {"error": "NotSupported"}))

    def nvmlDeviceGetMemoryInfo(self, h):
        mem = _answer(self._dev(h)["memory_mib"])
        return SimpleNamespace(total=mem[0] * 2**20, free=mem[1] * 2**20, used=(mem[0] - mem[1]) * 2**20)

    def nvmlDeviceGetMigMode(self, h):
        return list(_answer(self._dev(h).get("mig_mode", {"error": "NotSupported"})))

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return _answer(self._dev(h).get("max_mig_devices", 7))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        migs = self._dev(h).get("mig_devices", [])
        if k >= len(migs):
            raise pynvml.NVMLError(CODES["NotFound"])
        return ("mig", h[1], k)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def all_fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


# --- libcuda and the stand-in libraries ------------------------------------------------------------------------------
# A recorded machine's "cuda" block says what libcuda answered: {"library": "absent"}, or "init" (a CUresult number,
# or "hang"), "version" (cuDriverGetVersion) and "devices" (name, cc, memory_mib).  The compiled stand-ins
# (tests/fake_nvml) answer the same from environment variables; standin_env() writes them.

def _devices_spec(devices: list[dict]) -> str:
    items = []
    for d in devices:
        if not (isinstance(d.get("cc"), list) and isinstance(d.get("name"), str)):
            continue
        mem = d.get("memory_mib")
        mib = mem[0] if isinstance(mem, list) else mem if isinstance(mem, int) else 0
        items.append(f"{d['name']}|{d['cc'][0]}.{d['cc'][1]}|{mib}")
    return ";".join(items)


def nvml_present(fixture: dict) -> bool:
    init = fixture["nvml"].get("init")
    return not (isinstance(init, dict) and init.get("error") == "LibraryNotFound")


def cuda_present(fixture: dict) -> bool:
    return "cuda" in fixture and fixture["cuda"].get("library") != "absent"


def standin_env(fixture: dict) -> dict[str, str]:
    """FAKE_* variables that make the stand-ins answer as the recorded machine did."""
    env = {}
    nvml = fixture["nvml"]
    if nvml_present(fixture):
        init = nvml.get("init")
        env["FAKE_NVML_INIT"] = str(CODES[init["error"]]) if isinstance(init, dict) else "0"
        if isinstance(nvml.get("driver_version"), str):
            env["FAKE_NVML_DRIVER"] = nvml["driver_version"]
        for key in ("cuda_driver_version_v2", "cuda_driver_version"):
            if isinstance(nvml.get(key), int):
                env["FAKE_NVML_CUDA"] = str(nvml[key])
                break
        env["FAKE_NVML_DEVICES"] = _devices_spec(nvml.get("devices", []))
    if cuda_present(fixture):
        cuda = fixture["cuda"]
        env["FAKE_CUDA_INIT"] = str(cuda.get("init", 0))
        env["FAKE_CUDA_VERSION"] = str(cuda.get("version", 0))
        env["FAKE_CUDA_DEVICES"] = _devices_spec(cuda.get("devices", []))
    return env


def cuda_answer(fixture: dict, standin: Path, environ) -> dict | None:
    """What lorastrap.machine.cuda_probe.probe answers for the recorded machine, run in this process over the stand-in
    libcuda (a recorded hang is answered as the child's timeout; tests/test_detect.py runs that one for real)."""
    import ctypes

    from lorastrap.machine import cuda_probe
    if "cuda" not in fixture:
        return None
    if not cuda_present(fixture):
        return {"init_error": "LibraryNotFound", "init_message": "libcuda.so.1 not found", "devices": [],
                "failures": [], "cuda_driver_version": None}
    if fixture["cuda"].get("init") == "hang":
        return {"init_error": "Timeout", "init_message": "no answer within 20 s", "devices": [], "failures": [],
                "cuda_driver_version": None}
    for key, value in standin_env({"nvml": {"init": {"error": "LibraryNotFound"}}, "cuda": fixture["cuda"]}).items():
        environ.setenv(key, value)
    return cuda_probe.probe(ctypes.CDLL(str(standin / "libcuda.so.1")))


def machine(fixture: dict):
    """The machine description (what `lorastrap detect --json` prints there) of a recorded machine."""
    from lorastrap.machine.detect import build_machine
    from lorastrap.machine.model import Host
    from lorastrap.machine.nvml_probe import probe
    return build_machine(Host(**fixture["host"]), probe(RecordedNVML(fixture["nvml"])), fixture["env"],
                         tegra=fixture.get("tegra"))
