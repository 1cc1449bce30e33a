"""plan: recorded NVML answers of real machines → the profile the matrix data says they must get."""

import json
import platform
import shutil
import subprocess
import sys

import pytest
from conftest import no_nvidia_driver, ROOT, run_cli
from recorded_nvml import RecordedNVML, all_fixtures, cuda_answer, load

from lorastrap.matrix import plan as planner
from lorastrap.matrix import profiles
from lorastrap.machine.detect import build_machine
from lorastrap.machine.model import Host
from lorastrap.core.errors import ConfigError
from lorastrap.machine.nvml_probe import probe

MATRIX = profiles.load()


def machine_from(fixture: dict, cuda: dict | None = None):
    """The machine as detect builds it from the recorded answers (``cuda``: libcuda's, see cuda_answer)."""
    nvml = RecordedNVML(fixture["nvml"])
    raw = probe(nvml)
    assert nvml.calls[0] == "nvmlInit"
    if raw["init_error"] is None:
        assert nvml.calls[-1] == "nvmlShutdown"
    return build_machine(Host(**fixture["host"]), raw, fixture["env"], cuda=cuda, tegra=fixture.get("tegra"))


def test_at_least_fifteen_real_machines_are_recorded():
    assert len(all_fixtures()) >= 15
    for path in all_fixtures():
        fixture = load(path)
        assert fixture["source"] and fixture["machine"]
        assert path.stem.endswith("--" + fixture["expect"]["profile"]), "fixtures are named after their answer"


@pytest.mark.parametrize("path", all_fixtures(), ids=lambda p: p.stem)
def test_recorded_machine_gets_its_profile(path, fake_cuda_lib, monkeypatch):
    fixture = load(path)
    expect = fixture["expect"]
    machine = machine_from(fixture, cuda_answer(fixture, fake_cuda_lib, monkeypatch))
    if "answered_by" in expect:
        assert machine.nvidia.answered_by == expect["answered_by"]
    if "cuda" in expect:
        assert machine.virtual_packages.get("__cuda") == expect["cuda"]
    result = planner.plan(machine, MATRIX)
    assert result.profile == expect["profile"], planner.format_plan(result)
    text = planner.format_plan(result)
    if "warning" in expect:
        assert any(expect["warning"] in w.message for w in result.warnings), text
    if "no_warning" in expect:
        assert not any(expect["no_warning"] in w.message for w in result.warnings), text
    if "hint" in expect:
        assert any(expect["hint"] in h for h in result.hints), text
    if "finding" in expect:
        assert any(f.code == expect["finding"] for f in machine.findings), machine.findings
    if "devices" in expect:
        assert len(machine.devices) == expect["devices"]
    if "why_not_cuda12" in expect:
        why = planner.format_plan(result, why_not="cuda12")
        assert "unmet" in why and expect["why_not_cuda12"] in why, why
    # The JSON form round-trips through its model.
    assert planner.Plan.model_validate_json(result.model_dump_json()) == result


def test_mig_instances_are_planned_as_the_devices_a_process_sees():
    fixture = load(ROOT / "tests/fixtures/nvml/a100-mig-enabled_driver-535--cuda12.json")
    machine = machine_from(fixture)
    assert [d.mig_index for d in machine.devices] == [0, 1]
    assert all(d.memory_total_mib == 19968 and d.compute_capability == "8.0" for d in machine.devices)


def test_instance_memory_governs_the_memory_rule():
    # The same A100 split into instances smaller than the profile's minimum no longer fits a GPU profile.
    fixture = load(ROOT / "tests/fixtures/nvml/a100-mig-enabled_driver-535--cuda12.json")
    for mig in fixture["nvml"]["devices"][0]["mig_devices"]:
        mig["memory_mib"] = [4864 - 2048, 4000 - 2048]
    result = planner.plan(machine_from(fixture), MATRIX)
    assert result.profile == "cpu"
    cand = next(c for c in result.candidates if c.profile == "cuda12")
    assert [c.rule for c in cand.unmet] == ["gpu_memory_min_mib"]


def test_answers_follow_from_the_data_not_from_code(tmp_path):
    # Lower cuda12's driver floor in a copy of the matrix: the V100 + 470 node now gets cuda12.
    envs = tmp_path / "envs"
    shutil.copytree(ROOT / "envs", envs)
    text = (envs / "profiles.yaml").read_text().replace('value: "12.0"', 'value: "11.0"', 1)
    (envs / "profiles.yaml").write_text(text)
    fixture = load(ROOT / "tests/fixtures/nvml/v100-sxm2_driver-470--cuda11.json")
    assert planner.plan(machine_from(fixture), profiles.load(envs)).profile == "cuda12"


def test_forced_profile_says_what_it_breaks():
    fixture = load(ROOT / "tests/fixtures/nvml/k80_driver-470--cpu.json")
    result = planner.plan(machine_from(fixture), MATRIX, profile="cuda12")
    assert result.profile == "cuda12" and result.forced
    assert {c.rule for c in result.broken} == {"driver_cuda_min", "compute_capability"}


def test_seed_2023_is_chosen_only_by_name():
    fixture = load(ROOT / "tests/fixtures/nvml/v100-sxm2_driver-470--cuda11.json")
    machine = machine_from(fixture)
    assert planner.plan(machine, MATRIX).profile != "seed-2023"
    forced = planner.plan(machine, MATRIX, profile="seed-2023")
    assert forced.profile == "seed-2023" and forced.broken == []


def test_vp_files_match_the_driver_rules():
    # A GPU profile is locked with the lowest __cuda it claims to support.
    import yaml
    for name, p in MATRIX.profiles.items():
        vp = yaml.safe_load((ROOT / "envs" / p.virtual_packages).read_text())
        assert set(vp["subdirs"]) == set(p.platforms), name
        for subdir in vp["subdirs"].values():
            cuda = subdir["packages"].get("__cuda")
            need = p.requires.driver_cuda_min
            assert (cuda is None) == (need is None), name
            if need:
                assert cuda == need.value, name


# --- the CLI ---------------------------------------------------------------------------------------------------

@no_nvidia_driver
def test_plan_cli_on_this_machine_picks_cpu():
    res = run_cli("plan", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["plan"]["profile"] == "cpu" and out["machine"]["platform"] == "linux-64"


def test_plan_cli_login_node_overrides():
    res = run_cli("plan", env={"CONDA_OVERRIDE_CUDA": "12.4", "CONDA_OVERRIDE_CUDA_ARCH": "9.0"})
    assert res.returncode == 0 and res.stdout.startswith("profile: cuda12")


def test_why_not_lists_each_rule():
    res = run_cli("plan", "--why-not", "cuda12")
    assert res.returncode == 0
    assert "[unmet] needs an NVIDIA GPU" in res.stdout and "[ok] platform" in res.stdout
    assert "source:" in res.stdout


def test_unknown_profile_is_a_usage_error():
    res = run_cli("plan", "--profile", "nope")
    assert res.returncode == 2
    assert "unknown profile 'nope'" in res.stderr and "cuda12" in res.stderr and "Traceback" not in res.stderr


# --- malformed matrices ------------------------------------------------------------------------------------------

def broken_envs(tmp_path, edit):
    envs = tmp_path / "envs"
    shutil.copytree(ROOT / "envs", envs)
    edit(envs)
    return envs


@pytest.mark.parametrize("case,edit,expect", [
    ("bad-yaml", lambda e: (e / "profiles.yaml").write_text("profiles:\n  cpu: [unclosed\n"), "not valid YAML at line"),
    ("unknown-key", lambda e: (e / "profiles.yaml").write_text(
        (e / "profiles.yaml").read_text().replace("    priority: 0\n", "    priority: 0\n    priorty: 1\n")),
     "field 'profiles.cpu.priorty': Extra inputs are not permitted"),
    ("missing-spec", lambda e: (e / "cpu.yml").unlink(), "field 'profiles.cpu.spec'"),
    ("bad-version", lambda e: (e / "profiles.yaml").write_text(
        (e / "profiles.yaml").read_text().replace('value: "12.0"', 'value: "twelve"')),
     "field 'profiles.cuda12.requires.driver_cuda_min.value'"),
    ("unknown-platform", lambda e: (e / "profiles.yaml").write_text(
        (e / "profiles.yaml").read_text().replace("platforms: [linux-64]\n", "platforms: [linux-65]\n", 1)),
     "field 'profiles.cuda12.platforms'"),
])
def test_malformed_profiles_name_file_and_field(tmp_path, case, edit, expect):
    envs = broken_envs(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        profiles.load(envs)
    assert str(envs / "profiles.yaml") in info.value.what
    assert expect in info.value.what, info.value.what
    res = run_cli("plan", "--envs-dir", str(envs))
    assert res.returncode == 4 and "Traceback" not in res.stderr and expect in res.stderr


# --- derived files ---------------------------------------------------------------------------------------------

def test_committed_schemas_and_readme_table_are_up_to_date():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_table_lists_every_profile():
    readme = (ROOT / "README.md").read_text()
    for name in MATRIX.profiles:
        assert f"| `{name}` |" in readme


def test_plan_json_meets_the_committed_schemas_which_refuse_wrong_documents():
    """The committed schemas, read by an independent validator (jsonschema), accept the real output and refuse
    documents a reader would call wrong (so a vacuous schema fails); what the output says of this host is checked
    against the standard library, not against lorastrap's own model."""
    jsonschema = pytest.importorskip("jsonschema")
    out = json.loads(run_cli("plan", "--json").stdout)
    schemas = {n: json.loads((ROOT / "envs" / "schemas" / f"{n}.schema.json").read_text()) for n in ("machine", "plan")}
    for name, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(out[name], schema)
    machine, plan_out = out["machine"], out["plan"]
    wrong = [("machine", {k: v for k, v in machine.items() if k != "platform"}),
             ("machine", {**machine, "nvidia": "yes"}),
             ("machine", {**machine, "virtual_packages": {"__cuda": 12.4}}),
             ("machine", {**machine, "gpu_count": 1}),
             ("plan", {k: v for k, v in plan_out.items() if k != "reasons"}),
             ("plan", {**plan_out, "candidates": "cpu"})]
    for name, doc in wrong:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schemas[name])
    system = platform.system()
    assert machine["os"] == {"Linux": "linux", "Darwin": "osx", "Windows": "win"}[system]
    assert machine["arch"] == platform.machine().lower() or system == "Darwin"  # Rosetta: the hardware's arch
    if system == "Linux":  # glibc's own answer, through the C library rather than detect's confstr
        import ctypes
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            assert machine["glibc"] == libc.gnu_get_libc_version().decode()
        except AttributeError:  # not glibc (musl)
            assert machine["glibc"] is None


