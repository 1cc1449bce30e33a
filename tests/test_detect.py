"""detect: the real NVML path on this GPU-less machine, the child-process probe's failure modes, overrides."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import recorded_nvml
from conftest import no_nvidia_driver, run_cli

from lorastrap.core import subproc
from lorastrap.core.errors import ConfigError
from lorastrap.machine import detect, host as hostfacts, jetson, libfind, model
from lorastrap.matrix import profiles
from lorastrap.matrix import plan as planner
from lorastrap.machine.detect import build_machine
from lorastrap.machine.model import Host


@no_nvidia_driver
def test_real_nvml_on_this_machine_reports_library_not_found():
    raw = detect.nvml_facts()
    assert raw["init_error"] == "LibraryNotFound", raw
    assert raw["gpus"] == []


@no_nvidia_driver
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


@no_nvidia_driver
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
    machine = build_machine(hostfacts.host_facts(Path("/tmp")), raw, {})
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


# --- beyond NVML: libcuda, WSL2, Jetson, the library search -------------------------------------------------------

@no_nvidia_driver
def test_no_child_is_started_where_neither_library_exists():
    # This machine has no NVIDIA driver: the search answers, and the messages are the search's, not a child's.
    raw = detect.gpu_facts(environ={})
    for key, soname in (("nvml", "libnvidia-ml.so.1"), ("cuda", "libcuda.so.1")):
        assert raw[key]["init_error"] == "LibraryNotFound"
        assert raw[key]["init_message"].startswith(f"{soname} not found (LD_LIBRARY_PATH, /etc/ld.so.cache")
    assert raw["tegra"] is None


@no_nvidia_driver
def test_cuda_probe_child_reports_library_not_found_for_real():
    res = subproc.python_module("machine.cuda_probe", timeout=30, env=subproc.clean_env())
    answer = json.loads(res.stdout)
    assert answer["init_error"] == "LibraryNotFound" and "libcuda.so.1" in answer["init_message"]


def test_ld_so_cache_parser_agrees_with_ldconfig():
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not Path(ldconfig).exists() or not Path("/etc/ld.so.cache").exists():
        pytest.skip("no ldconfig or /etc/ld.so.cache here")
    listed = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout
    expected = [(line.split()[0], line.rsplit("=> ", 1)[1]) for line in listed.splitlines()[1:] if "=> " in line]
    assert libfind.cache_entries(Path("/etc/ld.so.cache")) == expected


def test_search_skips_files_the_loader_would_skip(tmp_path, fake_cuda_lib):
    (tmp_path / "libcuda.so.1").write_text("not an ELF file")
    env = {"LD_LIBRARY_PATH": f"{tmp_path}:{fake_cuda_lib}"}
    found = libfind.find("libcuda.so.1", environ=env, root=tmp_path / "root")
    assert found == libfind.Found(str(fake_cuda_lib / "libcuda.so.1"), "LD_LIBRARY_PATH")


def _standin_dir(tmp_path, fixture, fake_nvml_lib, fake_cuda_lib) -> Path:
    """A folder holding the stand-in libraries the recorded machine has."""
    folder = tmp_path / "lib"
    folder.mkdir(exist_ok=True)
    if recorded_nvml.nvml_present(fixture):
        shutil.copy(fake_nvml_lib / "libnvidia-ml.so.1", folder)
    if recorded_nvml.cuda_present(fixture):
        shutil.copy(fake_cuda_lib / "libcuda.so.1", folder)
    return folder


def _fixture(name):
    return recorded_nvml.load(recorded_nvml.FIXTURES / f"{name}.json")


def _detect_recorded(fixture, environ, root=Path("/"), timeout=20.0):
    """detect's real probe children over the stand-ins, for a recorded machine's host facts."""
    host = Host(**fixture["host"])
    raw = detect.gpu_facts(wsl=host.wsl, environ=environ, root=root, timeout=timeout)
    return raw, build_machine(host, raw["nvml"], fixture["env"], cuda=raw["cuda"], tegra=raw["tegra"])


def test_libcuda_only_container_is_found_through_libcuda(tmp_path, fake_nvml_lib, fake_cuda_lib, monkeypatch):
    fixture = _fixture("container-libcuda-only-a100_driver-535--cuda12")
    folder = _standin_dir(tmp_path, fixture, fake_nvml_lib, fake_cuda_lib)
    env = {**recorded_nvml.standin_env(fixture), "LD_LIBRARY_PATH": str(folder)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    raw, machine = _detect_recorded(fixture, dict(os.environ))
    assert raw["nvml"]["init_error"] == "LibraryNotFound" and raw["cuda"]["library"].endswith("(LD_LIBRARY_PATH)")
    assert machine.nvidia.answered_by == "libcuda" and machine.virtual_packages["__cuda"] == "12.2"
    assert [(d.name, d.compute_capability, d.memory_total_mib) for d in machine.devices] == [
        ("NVIDIA A100-SXM4-40GB", "8.0", 40960)]
    # ... and the CLI says so.
    res = run_cli("plan", "--json", env=env)
    out = json.loads(res.stdout)
    assert out["plan"]["profile"] == "cuda12", res.stderr
    assert out["machine"]["nvidia"]["answered_by"] == "libcuda"
    assert any("found by libcuda" in r for r in out["plan"]["reasons"])


def test_nvml_and_libcuda_disagreeing_is_reported(tmp_path, fake_nvml_lib, fake_cuda_lib):
    fixture = _fixture("cuda-compat-disagrees_driver-535--cuda12")
    folder = _standin_dir(tmp_path, fixture, fake_nvml_lib, fake_cuda_lib)
    env = {**recorded_nvml.standin_env(fixture), "LD_LIBRARY_PATH": str(folder)}
    res = run_cli("detect", "--json", env=env)
    machine = json.loads(res.stdout)
    probes = {p["name"]: p for p in machine["nvidia"]["probes"]}
    assert probes["nvml"]["cuda_driver_version"] == "12.2" and probes["libcuda"]["cuda_driver_version"] == "12.8"
    assert machine["virtual_packages"]["__cuda"] == "12.2"  # NVML first, as rattler
    assert any(f["code"] == "cuda-version-disagreement" for f in machine["findings"])


def test_wsl2_layout_libraries_only_under_wsl_lib(tmp_path, fake_nvml_lib, fake_cuda_lib, monkeypatch):
    fixture = _fixture("wsl2-rtx-3080_driver-560--cuda12")
    root = tmp_path / "root"
    wsl_lib = root / "usr" / "lib" / "wsl" / "lib"
    wsl_lib.mkdir(parents=True)
    shutil.copy(fake_nvml_lib / "libnvidia-ml.so.1", wsl_lib)
    shutil.copy(fake_cuda_lib / "libcuda.so.1", wsl_lib)
    for key, value in recorded_nvml.standin_env(fixture).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    raw, machine = _detect_recorded(fixture, dict(os.environ), root=root)
    assert raw["nvml"]["library"] == f"{wsl_lib}/libnvidia-ml.so.1 (extra directory)"
    assert machine.nvidia.nvml_status == "ok" and machine.nvidia.cuda_status == "ok"
    assert machine.virtual_packages["__cuda"] == "12.6" and machine.devices[0].compute_capability == "8.6"
    assert planner.plan(machine, profiles.load()).profile == "cuda12"
    # Not under WSL2, the folder is not searched: nothing is found and no child starts.
    raw = detect.gpu_facts(wsl=False, environ=dict(os.environ), root=root)
    assert raw["nvml"]["init_error"] == raw["cuda"]["init_error"] == "LibraryNotFound"


def test_jetson_layout_from_a_real_l4t_release(tmp_path, fake_cuda_lib, monkeypatch):
    fixture = _fixture("jetson-orin-nx_l4t-35.4.1--cpu")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text(fixture["tegra"]["nv_tegra_release"])
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "model").write_bytes(fixture["tegra"]["model"].encode() + b"\0")
    tegra_dir = next(d for d in libfind.search_dirs(root, wsl=False)[1] if d.name == "tegra")
    tegra_dir.mkdir(parents=True)
    shutil.copy(fake_cuda_lib / "libcuda.so.1", tegra_dir)
    for key, value in recorded_nvml.standin_env(fixture).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    raw, machine = _detect_recorded(fixture, dict(os.environ), root=root)
    assert raw["tegra"]["model"] == fixture["tegra"]["model"]
    board = machine.nvidia.jetson
    assert (board.l4t, board.cuda, board.jetpack) == ("35.4.1", "11.4", "5.x") and board.source
    assert machine.nvidia.answered_by == "libcuda" and machine.virtual_packages["__cuda"] == "11.4"
    assert machine.virtual_packages["__cuda_arch"] == "8.7"
    assert any(f.code == "jetson" for f in machine.findings)
    result = planner.plan(machine, profiles.load())
    assert result.profile == "cpu" and "linux-aarch64" in planner.format_plan(result, why_not="cuda12")


def test_jetson_without_libcuda_says_how_to_get_it():
    fixture = _fixture("jetson-orin-nx_l4t-35.4.1--cpu")
    machine = build_machine(Host(**fixture["host"]), NO_NVML, {}, cuda=dict(NO_NVML), tegra=fixture["tegra"])
    assert machine.nvidia.answered_by == "tegra" and "__cuda" not in machine.virtual_packages
    finding = next(f for f in machine.findings if f.code == "jetson-no-libcuda")
    assert "--runtime nvidia" in finding.fix


@pytest.mark.parametrize("text,release", [
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", "36.4.3"),
    ("# R32 (release), REVISION: 6.1, GCID: 27863751, BOARD: t210ref, EABI: aarch64", "32.6.1"),
    ("garbage", None)])
def test_l4t_release_and_its_cuda_come_from_data(text, release):
    assert jetson.l4t_release(text) == release
    if release:
        board = jetson.board({"nv_tegra_release": text}, jetson.table())
        assert board.cuda == {"36": "12.6", "32": "10.2"}[release.split(".")[0]]


def test_hung_cuinit_times_out_while_nvml_still_answers(tmp_path, fake_nvml_lib, fake_cuda_lib, monkeypatch):
    fixture = _fixture("rtx-4090_driver-550--cuda12")
    fixture["cuda"] = {"init": "hang"}
    folder = _standin_dir(tmp_path, fixture, fake_nvml_lib, fake_cuda_lib)
    for key, value in {**recorded_nvml.standin_env(fixture), "LD_LIBRARY_PATH": str(folder)}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    raw, machine = _detect_recorded(fixture, dict(os.environ), timeout=1.5)
    assert time.monotonic() - start < 10
    assert raw["cuda"]["init_error"] == "Timeout" and raw["nvml"]["init_error"] is None
    assert machine.nvidia.answered_by == "nvml" and machine.virtual_packages["__cuda"] == "12.4"
    assert any(f.code == "cuda-Timeout" for f in machine.findings)


def test_plan_uses_libcuda_when_nvml_is_broken(fake_cuda_lib, monkeypatch):
    # NVML fails (no permission) but libcuda answers: the GPU is planned for, and NVML's failure is a warning.
    fixture = _fixture("container-libcuda-only-a100_driver-535--cuda12")
    cuda = recorded_nvml.cuda_answer(fixture, fake_cuda_lib, monkeypatch)
    machine = build_machine(Host(**fixture["host"]), {"init_error": "NoPermission", "gpus": [], "failures": []},
                            {}, cuda=cuda)
    assert machine.nvidia.answered_by == "libcuda"
    finding = next(f for f in machine.findings if f.code == "nvml-NoPermission")
    assert finding.severity == "warning" and "through libcuda" in finding.what
    assert planner.plan(machine, profiles.load()).profile == "cuda12"


def test_overrides_stay_above_every_probe(fake_cuda_lib, monkeypatch):
    fixture = _fixture("container-libcuda-only-a100_driver-535--cuda12")
    cuda = recorded_nvml.cuda_answer(fixture, fake_cuda_lib, monkeypatch)
    machine = build_machine(Host(**fixture["host"]), NO_NVML, {"CONDA_OVERRIDE_CUDA": ""}, cuda=cuda)
    assert "__cuda" not in machine.virtual_packages and "__cuda_arch" not in machine.virtual_packages
    machine = build_machine(Host(**fixture["host"]), NO_NVML, {"CONDA_OVERRIDE_CUDA": "12.8"}, cuda=cuda)
    assert machine.virtual_packages["__cuda"] == "12.8" and machine.virtual_packages["__cuda_arch"] == "8.0"


def test_nvml_without_libcuda_warns_that_cuda_cannot_run():
    raw = {"init_error": None, "driver_version": "550.40.07", "cuda_driver_version": 12040, "failures": [],
           "gpus": [{"index": 0, "name": "x", "compute_capability": "8.9", "memory_total_mib": 24564}]}
    missing = {"init_error": "LibraryNotFound", "devices": [], "failures": []}
    machine = build_machine(_host(kernel_module_version="550.40.07"), raw, {}, cuda=missing)
    assert any(f.code == "nvml-without-libcuda" and f.severity == "warning" for f in machine.findings)


# --- parity with py-rattler's own virtual-package detection ------------------------------------------------------

RATTLER_CUDA = """
import os, sys
from rattler import VirtualPackage, VirtualPackageOverrides
found = {}
for vp in VirtualPackage.detect(VirtualPackageOverrides.from_env()):
    pkg = vp.into_generic()
    found[pkg.name.normalized] = str(pkg.version)
print(found.get("__cuda", "-"), found.get("__cuda_arch", "-"))
sys.stdout.flush()
os._exit(0)  # py-rattler may crash at interpreter exit after answering
"""


@pytest.mark.parametrize("path", [p for p in recorded_nvml.all_fixtures()
                                  if recorded_nvml.load(p).get("cuda", {}).get("init") != "hang"],
                         ids=lambda p: p.stem)
def test_cuda_agrees_with_py_rattler(path, tmp_path, fake_nvml_lib, fake_cuda_lib):
    # Both detections run over the same stand-in libraries, answering as the recorded machine did: py-rattler's
    # VirtualPackage.detect in a child, and detect's own probe children.  (A hung cuInit is left out: py-rattler
    # has no timeout and would hang with it; test_hung_cuinit_... covers ours.)
    fixture = recorded_nvml.load(path)
    folder = _standin_dir(tmp_path, fixture, fake_nvml_lib, fake_cuda_lib)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDA_OVERRIDE_", "FAKE_", "CUDA_VISIBLE"))}
    env.update(recorded_nvml.standin_env(fixture), **fixture["env"], LD_LIBRARY_PATH=str(folder))
    res = subprocess.run([sys.executable, "-c", RATTLER_CUDA], capture_output=True, text=True, env=env, timeout=60)
    rattler_cuda = res.stdout.split()[0]
    host = Host(**{**fixture["host"], "wsl": False})
    raw = detect.gpu_facts(environ=env, root=tmp_path / "no-root")
    ours = build_machine(host, raw["nvml"], fixture["env"], cuda=raw["cuda"])
    assert ours.virtual_packages.get("__cuda", "-") == rattler_cuda, (res.stdout, res.stderr, raw)
    assert ours.virtual_packages.get("__cuda_arch", "-") == res.stdout.split()[1], (res.stdout, raw)


def test_a_broken_l4t_table_is_a_config_error(tmp_path):
    (tmp_path / "jetson.yaml").write_text("schema_version: 1\nl4t:\n  - release: 36.4\n    jetpack: '6'\n    cuda: twelve\n"
                                          "    source: x\n")
    with pytest.raises(ConfigError) as info:
        jetson.table(tmp_path)
    assert str(tmp_path / "jetson.yaml") in info.value.what and info.value.fix


def test_nvml_v1_cuda_version_only_where_the_driver_has_no_v2():
    # v2 failing with LibraryNotFound means libcuda is missing; v1 would then answer "a known supported version"
    # (NVML docs).  Like rattler, the probe takes v1 only when the v2 symbol is missing.
    from lorastrap.machine.nvml_probe import probe
    base = {"driver_version": "550.40.07", "cuda_driver_version": 12040, "devices": []}
    assert probe(recorded_nvml.RecordedNVML(
        {**base, "cuda_driver_version_v2": {"error": "LibraryNotFound"}}))["cuda_driver_version"] is None
    assert probe(recorded_nvml.RecordedNVML(
        {**base, "cuda_driver_version_v2": {"error": "FunctionNotFound"}}))["cuda_driver_version"] == 12040


def test_a_machine_description_from_before_the_new_probes_still_reads():
    # schema_version 1 grew compatibly: a description without cuda_status / answered_by / probes / jetson is valid.
    fixture = _fixture("kernel-nvml-mismatch_driver-550--cpu")
    old = json.loads(build_machine(Host(**fixture["host"]), {"init_error": "LibRmVersionMismatch", "gpus": [],
                                                              "failures": []}, {}).model_dump_json())
    for key in ("cuda_status", "answered_by", "probes", "jetson"):
        del old["nvidia"][key]
    machine = model.Machine.model_validate(old)
    result = planner.plan(machine, profiles.load())
    assert result.profile == "cpu" and any("LibRmVersionMismatch" in h for h in result.hints)
