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
    for name, words in expect.get("why_not", {}).items():
        why = planner.format_plan(result, why_not=name)
        assert f"{name} does not fit" in why and words in why, why
    if "alternative" in expect:
        assert expect["alternative"] in result.alternatives, text
        assert f"alternative: {expect['alternative']} also fits" in text
        why = planner.format_plan(result, why_not=expect["alternative"])
        assert f"an alternative to {result.profile}" in why, why
    if "no_alternative" in expect:
        assert expect["no_alternative"] not in result.alternatives, text
    if "reason" in expect:
        assert any(expect["reason"] in r for r in result.reasons), text
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


def test_a_gpu_machine_planned_without_a_gpu_profile_always_hears_why():
    # Never just "cpu": every recorded machine with a GPU (or a CUDA driver) that gets no GPU profile has a hint
    # naming the upgrade, the driver error, or each GPU profile and what stands in its way.
    seen = 0
    for path in all_fixtures():
        fixture = load(path)
        machine = machine_from(fixture, None)
        result = planner.plan(machine, MATRIX)
        gpu_profile = result.profile and MATRIX.profiles[result.profile].requires.gpu
        if (machine.devices or machine.cuda or machine.nvidia.jetson) and not gpu_profile:
            seen += 1
            assert result.hints, (path.stem, planner.format_plan(result))
    assert seen >= 4


@pytest.mark.parametrize("cc,component,way", [
    ("9.0", "pytorch", "sm_90"), ("8.9", "pytorch", "sm_87"), ("10.3", "pytorch", "sm_100"),
    ("12.1", "pytorch", "sm_120"), ("13.0", "pytorch", "PTX compute_120"), ("7.0", "pytorch", None),
    ("12.1", "bitsandbytes", "sm_121"), ("8.7", "bitsandbytes", "sm_80"), ("13.0", "bitsandbytes", None)])
def test_code_rules_follow_binary_and_ptx_compatibility(cc, component, way):
    # A cubin runs on the same major version at the same or a higher minor; PTX on any later compute capability.
    rule = next(r for r in MATRIX.profiles["cuda13-aarch64"].requires.cuda_code if r.component.startswith(component))
    assert rule.runs_on(cc) == way


def test_a_v100_on_a_cuda_13_driver_never_gets_a_cuda_13_build():
    for name in ("v100_driver-580--cuda12", "rtx-5090-plus-v100_driver-580--cuda12"):
        result = planner.plan(machine_from(load(ROOT / f"tests/fixtures/nvml/{name}.json")), MATRIX)
        assert result.profile == "cuda12"
        cuda13 = next(c for c in result.candidates if c.profile == "cuda13")
        assert not cuda13.fits and [c.rule for c in cuda13.unmet] == ["cuda_code"]
        # Both components lack Volta code, and the message says so for each.
        assert "pytorch 2.13 cuda130" in cuda13.unmet[0].message and "libbitsandbytes_cuda130" in cuda13.unmet[0].message
        forced = planner.plan(machine_from(load(ROOT / f"tests/fixtures/nvml/{name}.json")), MATRIX, profile="cuda13")
        assert [c.rule for c in forced.broken] == ["cuda_code"]


def test_the_cuda_13_answers_follow_from_the_code_lists(tmp_path):
    # Give cuda13's two components Volta code in a copy of the matrix: the V100 node now fits cuda13 too (as the
    # alternative, cuda12 keeps its priority).  Nothing in the code knows a V100.
    envs = tmp_path / "envs"
    shutil.copytree(ROOT / "envs", envs)
    text = (envs / "profiles.yaml").read_text()
    text = text.replace('cubins: ["7.5", "8.0", "8.6", "9.0", "10.0", "11.0", "12.0"]',
                        'cubins: ["7.0", "7.5", "8.0", "8.6", "9.0", "10.0", "11.0", "12.0"]', 1)
    text = text.replace('cubins: ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]',
                        'cubins: ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]', 1)
    (envs / "profiles.yaml").write_text(text)
    machine = machine_from(load(ROOT / "tests/fixtures/nvml/v100_driver-580--cuda12.json"))
    assert "cuda13" not in planner.plan(machine, MATRIX).alternatives
    assert "cuda13" in planner.plan(machine, profiles.load(envs)).alternatives


def test_thor_fits_the_arm_cuda_13_build_only_from_jetpack_7():
    # The same Thor on an L4T release below the rule's minimum: no GPU profile, and the hint names the release.
    fixture = load(ROOT / "tests/fixtures/nvml/jetson-agx-thor_jetpack-7--cuda13-aarch64.json")
    fixture["tegra"]["nv_tegra_release"] = fixture["tegra"]["nv_tegra_release"].replace("R38 (release), REVISION: 2.0",
                                                                                        "R36 (release), REVISION: 4.3")
    result = planner.plan(machine_from(fixture), MATRIX)
    assert result.profile == "cpu"
    assert any("Jetson Linux (L4T) >= 38.2 enables cuda13-aarch64" in h for h in result.hints), result.hints


def test_a_gpu_no_profile_covers_is_named_with_each_profiles_reason():
    # A V100 in an Arm server: PyTorch's CUDA 12.9 SBSA build has sm_70 but bitsandbytes' aarch64 libraries start
    # at sm_75, and CUDA 13 has no Volta at all.  cpu is chosen, and the hint says why for every Arm GPU profile.
    fixture = load(ROOT / "tests/fixtures/nvml/v100_driver-580--cuda12.json")
    fixture["host"]["machine"] = "aarch64"
    result = planner.plan(machine_from(fixture), MATRIX)
    assert result.profile == "cpu"
    hint = " ".join(result.hints)
    assert "no GPU profile fits this GPU machine" in hint
    assert "cuda12-aarch64: compute capability 7.0 has no code in bitsandbytes 0.50.2 libbitsandbytes_cuda128.so" in hint
    assert "cuda13-aarch64: compute capability 7.0 has no code in pytorch 2.13 cuda130 sbsa" in hint


def test_vp_files_match_the_glibc_rules():
    # A profile is locked for the oldest glibc it claims to support.
    import yaml
    for name, p in MATRIX.profiles.items():
        vp = yaml.safe_load((ROOT / "envs" / p.virtual_packages).read_text())
        for subdir, body in vp["subdirs"].items():
            if subdir.startswith("linux") and p.requires.glibc_min is not None:
                assert body["packages"]["__glibc"] == p.requires.glibc_min.value, name


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


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").machine() != "x86_64",
                    reason="the CLI plans for this machine's platform; the test expects linux-64")
def test_why_not_works_for_the_choice_and_its_alternative():
    env = {"CONDA_OVERRIDE_CUDA": "13.0", "CONDA_OVERRIDE_CUDA_ARCH": "9.0", "CONDA_OVERRIDE_GLIBC": "2.35"}
    res = run_cli("plan", env=env)
    assert res.returncode == 0 and res.stdout.startswith("profile: cuda12"), res.stdout
    assert "alternative: cuda13 also fits (`--profile cuda13`" in res.stdout
    assert "chosen over cuda13, cuda11, which also fit: it is all conda" in res.stdout
    chosen = run_cli("plan", "--why-not", "cuda12", env=env)
    assert "cuda12 fits this machine and is the one chosen:" in chosen.stdout
    alt = run_cli("plan", "--why-not", "cuda13", env=env)
    assert "cuda13 fits this machine (an alternative to cuda12: `--profile cuda13` installs it):" in alt.stdout
    assert "[ok] every GPU runs each build's code: 9.0 (pytorch sm_90, bitsandbytes sm_90)" in alt.stdout
    # The same login node planning for Volta nodes: cuda13 is out, and --why-not says which rule.
    volta = run_cli("plan", "--why-not", "cuda13", env={**env, "CONDA_OVERRIDE_CUDA_ARCH": "7.0"})
    assert "cuda13 does not fit" in volta.stdout and "[unmet] compute capability 7.0 has no code" in volta.stdout
    out = json.loads(run_cli("plan", "--json", env=env).stdout)
    assert out["plan"]["alternatives"] == ["cuda13", "cuda11"]


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


def test_checked_matrix_is_kept_and_a_damaged_entry_ignored(tmp_path, monkeypatch):
    """profiles.load keeps the matrix it checked in the data dir's checked/, keyed on the file's bytes, and reads
    it from there next time; an entry that is not JSON, or not the matrix, is ignored and written again; a data
    dir that cannot be used only costs the check."""
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    envs = broken_envs(tmp_path, lambda e: None)
    assert profiles.load(envs) == MATRIX and not (tmp_path / "home").exists()  # read-only (plan, a dry run): kept not
    first = profiles.load(envs, keep=True)
    assert first == MATRIX
    kept = list((tmp_path / "home" / "checked").glob("profiles.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["matrix"] == first.model_dump(mode="json")
    for damage in ('{"key": "x", "matrix": ', json.dumps({"key": json.loads(kept[0].read_text())["key"],
                                                            "matrix": {"schema_version": 1}}), ""):
        kept[0].write_text(damage)
        assert profiles.load(envs, keep=True) == first
        assert json.loads(kept[0].read_text())["matrix"] == first.model_dump(mode="json")  # written again
    (envs / "profiles.yaml").write_text((envs / "profiles.yaml").read_text().replace('value: "12.0"', 'value: "x"'))
    with pytest.raises(ConfigError, match="driver_cuda_min.value"):  # another file: checked, not the kept one
        profiles.load(envs)
    missing = broken_envs(tmp_path / "again", lambda e: (e / "cpu.yml").unlink())  # the kept profiles.yaml
    with pytest.raises(ConfigError, match="profiles.cpu.spec"):  # the files it names: checked every time
        profiles.load(missing)
    monkeypatch.setenv("LORASTRAP_HOME", "relative/home")  # refused by the data dir: not kept, still loaded
    assert profiles.load(keep=True) == MATRIX


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


