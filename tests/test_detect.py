"""detect: the real NVML path on this GPU-less machine, the child-process probe's failure modes, overrides."""

import json
import time

import pytest
from conftest import run_cli

from lorastrap import detect
from lorastrap.detect import Host, build_machine


def test_real_nvml_on_this_machine_reports_library_not_found():
    raw = detect.nvml_facts()
    assert raw["init_error"] == "LibraryNotFound", raw
    assert raw["gpus"] == []


def test_detect_json_cli_describes_a_cpu_machine():
    res = run_cli("detect", "--json")
    assert res.returncode == 0, res.stderr
    machine = json.loads(res.stdout)
    assert machine["schema_version"] == 1
    assert machine["platform"] == "linux-64"
    assert machine["nvidia"]["nvml_status"] == "LibraryNotFound"
    assert machine["devices"] == []
    assert "__cuda" not in machine["virtual_packages"]
    assert machine["virtual_packages"]["__glibc"] == machine["glibc"]
    assert machine["resources"]["cpu_count"] >= 1 and machine["resources"]["ram_total_mib"] > 0
    assert any(f["code"] == "nvml-LibraryNotFound" for f in machine["findings"])
    assert "Traceback" not in res.stderr


def test_detect_table_is_readable():
    res = run_cli("detect")
    assert res.returncode == 0
    assert "platform" in res.stdout and "NVML" in res.stdout and "LibraryNotFound" in res.stdout


@pytest.mark.parametrize("code,name", [(4, "NoPermission"), (9, "DriverNotLoaded"), (18, "LibRmVersionMismatch"),
                                       (17, "OperatingSystem"), (3, "NotSupported"), (13, "FunctionNotFound"),
                                       (15, "GpuIsLost"), (999, "Unknown")])
def test_probe_child_reports_nvml_init_errors(fake_nvml_lib, monkeypatch, code, name):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_nvml_lib))
    monkeypatch.setenv("FAKE_NVML_INIT", str(code))
    res = run_cli("detect", "--json")
    assert res.returncode == 0, res.stderr
    machine = json.loads(res.stdout)
    assert machine["nvidia"]["nvml_status"] == name
    finding = next(f for f in machine["findings"] if f["code"] == f"nvml-{name}")
    assert finding["why"] and finding["fix"]
    assert machine["devices"] == [] and "__cuda" not in machine["virtual_packages"]


def test_hung_driver_times_out_instead_of_hanging(fake_nvml_lib, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_nvml_lib))
    monkeypatch.setenv("FAKE_NVML_INIT", "hang")
    start = time.monotonic()
    raw = detect.nvml_facts(timeout=1.5)
    assert time.monotonic() - start < 10
    assert raw["init_error"] == "Timeout"
    machine = build_machine(detect.host_facts(detect.Path("/tmp")), raw, {})
    assert machine.nvidia.nvml_status == "Timeout" and machine.devices == []


def test_probe_child_runs_without_cuda_visible_devices(fake_nvml_lib, monkeypatch):
    # An empty CUDA_VISIBLE_DEVICES hides every GPU from CUDA: the probe must not inherit it.  The stand-in
    # library answers Unknown if it sees the variable, LibraryNotFound if not.
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_nvml_lib))
    monkeypatch.setenv("FAKE_NVML_INIT", "cvd")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect.nvml_facts()["init_error"] == "LibraryNotFound"


def _host(**kw):
    base = dict(system="linux", machine="x86_64", glibc="2.35", kernel="5.15.0")
    base.update(kw)
    return Host(**base)


NO_NVML = {"init_error": "LibraryNotFound", "gpus": [], "failures": []}


def test_override_cuda_and_arch_on_a_gpu_less_node():
    m = build_machine(_host(), NO_NVML, {"CONDA_OVERRIDE_CUDA": "12.4", "CONDA_OVERRIDE_CUDA_ARCH": "8.0"})
    assert m.virtual_packages["__cuda"] == "12.4" and m.virtual_packages["__cuda_arch"] == "8.0"
    assert m.overrides == {"CONDA_OVERRIDE_CUDA": "12.4", "CONDA_OVERRIDE_CUDA_ARCH": "8.0"}


def test_empty_cuda_override_removes_cuda_and_cuda_arch():
    raw = {"init_error": None, "driver_version": "550.40.07", "cuda_driver_version": 12040, "failures": [],
           "gpus": [{"index": 0, "name": "x", "compute_capability": "8.9", "memory_total_mib": 24564}]}
    m = build_machine(_host(kernel_module_version="550.40.07"), raw, {})
    assert m.virtual_packages["__cuda"] == "12.4" and m.virtual_packages["__cuda_arch"] == "8.9"
    m = build_machine(_host(kernel_module_version="550.40.07"), raw, {"CONDA_OVERRIDE_CUDA": ""})
    assert "__cuda" not in m.virtual_packages and "__cuda_arch" not in m.virtual_packages


def test_cuda_arch_override_without_cuda_is_absent():
    # CEP 46: __cuda_arch is absent when __cuda is absent.
    m = build_machine(_host(), NO_NVML, {"CONDA_OVERRIDE_CUDA_ARCH": "9.0"})
    assert "__cuda_arch" not in m.virtual_packages


def test_glibc_override():
    m = build_machine(_host(), NO_NVML, {"CONDA_OVERRIDE_GLIBC": "2.17"})
    assert m.glibc == "2.17" and m.virtual_packages["__glibc"] == "2.17"


@pytest.mark.parametrize("system,machine,expected", [
    ("linux", "x86_64", "linux-64"), ("linux", "aarch64", "linux-aarch64"), ("darwin", "arm64", "osx-arm64"),
    ("darwin", "x86_64", "osx-64"), ("windows", "amd64", "win-64"), ("linux", "riscv64", None)])
def test_platform_mapping_is_an_explicit_list(system, machine, expected):
    m = build_machine(_host(system=system, machine=machine, glibc=None), NO_NVML, {})
    assert m.platform == expected
    assert (expected is None) == any(f.code == "unsupported-platform" for f in m.findings)


def test_overrides_reach_the_cli(monkeypatch):
    res = run_cli("detect", "--json", env={"CONDA_OVERRIDE_CUDA": "12.2", "CONDA_OVERRIDE_CUDA_ARCH": "7.5"})
    vp = json.loads(res.stdout)["virtual_packages"]
    assert vp["__cuda"] == "12.2" and vp["__cuda_arch"] == "7.5"
