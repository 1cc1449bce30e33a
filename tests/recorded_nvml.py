"""Recorded NVML answers of real machines: the one fake in the test suite, at the hardware boundary.

A fixture (tests/fixtures/nvml/*.json) says what each NVML call answered on a machine; RecordedNVML replays it
with nvidia-ml-py's own error classes, so lorastrap.nvml_probe.probe runs unchanged against it.  A value given as
{"error": "Name"} raises NVMLError with that NVML_ERROR_* code.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pynvml

from lorastrap.nvml_probe import ERROR_NAMES

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


def machine(fixture: dict):
    """The machine description (what `lorastrap detect --json` prints there) of a recorded machine."""
    from lorastrap.detect import Host, build_machine
    from lorastrap.nvml_probe import probe
    return build_machine(Host(**fixture["host"]), probe(RecordedNVML(fixture["nvml"])), fixture["env"])
