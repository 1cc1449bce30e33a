"""The real envs/*.yml specs locked against conda-forge's own metadata (scripts/condaforge_channel.py, transcribed
from the feedstocks) with the pip side checked against real PyPI metadata (tests/fixtures/pypi/index.json, recorded
with scripts/pypi_fixture.py), served on 127.0.0.1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from lorastrap.locking import lockfile, wheels
from lorastrap.core import subproc

ENVS = ROOT / "envs"
FIXTURE = ROOT / "tests" / "fixtures" / "pypi" / "index.json"
MICROMAMBA = ROOT.parent / "shared" / "tools" / "micromamba" / "bin" / "micromamba"


@pytest.fixture(scope="session")
def cf(tmp_path_factory):
    """The transcribed conda-forge channel and the recorded PyPI index, built once, served on 127.0.0.1."""
    import pypi_fixture
    import testchannel
    out = tmp_path_factory.mktemp("condaforge")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "condaforge_channel.py"), "build", str(out)], check=True,
                   capture_output=True, timeout=300)
    pypi_fixture.write_index(FIXTURE, out)
    server, url = testchannel.serve(out)
    yield {"channel": f"{url}/channel", "simple": f"{url}/simple", "base": url}
    server.shutdown()


def envs_copy(tmp_path, edits=None):
    """envs/ copied, with {file: (old, new)} replacements applied."""
    envs = tmp_path / "envs"
    shutil.copytree(ENVS, envs, ignore=shutil.ignore_patterns("*.conda-lock.yml"))
    for name, (old, new) in (edits or {}).items():
        text = (envs / name).read_text()
        assert old in text, (name, old)
        (envs / name).write_text(text.replace(old, new))
    return envs


def do_lock(cf, envs, profile, out, *args):
    return run_cli("lock", "--envs-dir", str(envs), "--profile", profile, "--channel", cf["channel"],
                   "--pip-index-url", cf["simple"], "-o", str(out), *args, timeout=300)


def locked(cf, envs, profile, out, *args):
    res = do_lock(cf, envs, profile, out, *args)
    assert res.returncode == 0, res.stderr
    return lockfile.read_lock(out)


def pick(lk, platform, name):
    found = [e for e in lk.for_platform(platform) if e.name == name]
    assert len(found) == 1, (platform, name, found)
    return found[0]


def fixture_sha(filename):
    doc = json.loads(FIXTURE.read_text())
    return next(f["sha256"] for p in doc["projects"].values() for f in p["files"] if f["filename"] == filename)


def test_cpu_every_platform_cpu_builds_and_the_wheels_that_fit(cf, home, tmp_path):
    lk = locked(cf, ENVS, "cpu", tmp_path / "cpu.conda-lock.yml")
    assert set(lk.platforms) == {"linux-64", "linux-aarch64", "osx-arm64"}
    wheels = {"linux-64": "manylinux_2_24_x86_64", "linux-aarch64": "manylinux_2_24_aarch64",
              "osx-arm64": "macosx_14_0_arm64"}
    for platform, tag in wheels.items():
        assert pick(lk, platform, "pytorch").build.startswith("cpu_")
        assert not any(e.name in ("cuda-version", "cudatoolkit", "triton") for e in lk.for_platform(platform))
        assert pick(lk, platform, "peft").version == "0.19.1"
        pip = [e for e in lk.for_platform(platform) if e.manager == "pip"]
        assert [(e.name, e.version) for e in pip] == [("bitsandbytes", "0.50.2")]
        assert pip[0].filename == f"bitsandbytes-0.50.2-py3-none-{tag}.whl"
        assert pip[0].sha256 == fixture_sha(pip[0].filename)
    # __osx 14.0 admits conda-forge's pytorch 2.13 (needs __osx >= 12.0); linux stays at 2.10 (the newest built there)
    assert pick(lk, "osx-arm64", "pytorch").version == "2.13.0"
    assert pick(lk, "linux-64", "pytorch").build.startswith("cpu_mkl")
    # transformers >= 5.13.0 build 1 needs safetensors >= 0.8, which conda-forge lacks: the solve takes 5.13.0 build 0
    assert (pick(lk, "linux-64", "transformers").version, pick(lk, "linux-64", "transformers").build) == \
        ("5.13.0", "pyhd8ed1ab_0")
    render = subprocess.run([str(Path(sys.executable).parent / "conda-lock"), "render", "--kind", "explicit", "-p",
                             "osx-arm64", str(tmp_path / "cpu.conda-lock.yml")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert render.returncode == 0, render.stderr


@pytest.mark.parametrize("cuda", ["12.0", "12.4", "13.0"])
def test_cuda12_gets_the_cuda129_builds(cf, home, tmp_path, cuda):
    envs = envs_copy(tmp_path, {"cuda12.virtual-packages.yml": ('__cuda: "12.0"', f'__cuda: "{cuda}"')})
    lk = locked(cf, envs, "cuda12", tmp_path / "cuda12.conda-lock.yml")
    assert pick(lk, "linux-64", "pytorch").build.startswith("cuda129_mkl_py312")
    assert pick(lk, "linux-64", "bitsandbytes").build.startswith("cuda129_py312")
    assert pick(lk, "linux-64", "bitsandbytes").version == "0.49.2"
    assert pick(lk, "linux-64", "cuda-version").version == "12.9"
    assert pick(lk, "linux-64", "triton").version == "3.6.0"
    assert pick(lk, "linux-64", "peft").version == "0.19.1"


# profile, platform, PyTorch build, cuda-version, cuda-cudart, libcublas, triton, bitsandbytes wheel
GPU_PIP_PROFILES = [
    ("cuda13", "linux-64", "cuda130_mkl_py312", "13.0", "13.0.96", "13.1.1.3", "cuda130py312",
     "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"),
    ("cuda13-aarch64", "linux-aarch64", "cuda130_generic_py312", "13.0", "13.0.96", "13.1.1.3", "cuda130py312",
     "bitsandbytes-0.50.2-py3-none-manylinux_2_24_aarch64.whl"),
    ("cuda12-aarch64", "linux-aarch64", "cuda129_generic_py312", "12.9", "12.9.79", "12.9.2.10", "cuda129py312",
     "bitsandbytes-0.50.2-py3-none-manylinux_2_24_aarch64.whl"),
]


@pytest.mark.parametrize("profile,platform,torch_build,cuda_version,cudart,cublas,triton,wheel", GPU_PIP_PROFILES,
                         ids=[p[0] for p in GPU_PIP_PROFILES])
def test_arm_and_cuda13_profiles_lock_their_cuda_builds_with_bitsandbytes_from_pypi(
        cf, home, tmp_path, profile, platform, torch_build, cuda_version, cudart, cublas, triton, wheel):
    lk = locked(cf, ENVS, profile, tmp_path / f"{profile}.conda-lock.yml")
    assert set(lk.platforms) == {platform}
    assert pick(lk, platform, "pytorch").version == "2.13.0"
    assert pick(lk, platform, "pytorch").build.startswith(torch_build)
    assert pick(lk, platform, "cuda-version").version == cuda_version
    # what libbitsandbytes_cuda1{28,30}.so needs at run time: libcudart.so.N, libcublas.so.N, libcublasLt.so.N
    assert pick(lk, platform, "cuda-cudart").version == cudart
    assert pick(lk, platform, "libcublas").version == cublas
    assert pick(lk, platform, "triton").build.startswith(triton)
    if platform == "linux-aarch64":  # the SBSA builds, never the tegra ones
        assert pick(lk, platform, "arm-variant").build == "sbsa"
    conda_names = {e.name for e in lk.for_platform(platform) if e.manager == "conda"}
    assert "bitsandbytes" not in conda_names and "cpu" not in pick(lk, platform, "pytorch").build
    pip = [e for e in lk.for_platform(platform) if e.manager == "pip"]
    assert [(e.name, e.version, e.filename) for e in pip] == [("bitsandbytes", "0.50.2", wheel)]
    assert pip[0].sha256 == fixture_sha(wheel)


@pytest.mark.parametrize("profile", ["cuda13", "cuda13-aarch64"])
def test_a_cuda_13_lock_needs_a_cuda_13_driver(cf, home, tmp_path, profile):
    # cuda-version 13.0 has run_constrained __cuda >=13: the profile's driver floor is what the solver enforces.
    envs = envs_copy(tmp_path, {f"{profile}.virtual-packages.yml": ('__cuda: "13.0"', '__cuda: "12.9"')})
    res = do_lock(cf, envs, profile, tmp_path / "x.conda-lock.yml")
    assert res.returncode == 4, res.stderr
    assert "__cuda" in res.stderr and "12.9" in res.stderr and "Traceback" not in res.stderr


def test_cuda12s_glibc_floor_comes_from_libcublas(cf, home, tmp_path):
    # PyTorch's CUDA 12.9 build is on the 2.17 sysroot, but libcublas 12.9 is on 2.28: a 2.17 lock cannot solve.
    envs = envs_copy(tmp_path, {"cuda12.virtual-packages.yml": ('__glibc: "2.28"', '__glibc: "2.17"')})
    res = do_lock(cf, envs, "cuda12", tmp_path / "x.conda-lock.yml")
    assert res.returncode == 4, res.stderr
    assert "__glibc >=2.28" in res.stderr and "libcublas" in res.stderr, res.stderr


def test_cuda11_under_a_cuda_11_4_driver(cf, home, tmp_path):
    envs = envs_copy(tmp_path, {"cuda11.virtual-packages.yml": ('__cuda: "11.0"', '__cuda: "11.4"')})
    lk = locked(cf, envs, "cuda11", tmp_path / "cuda11.conda-lock.yml")
    assert pick(lk, "linux-64", "pytorch").build.startswith("cuda118_")
    assert pick(lk, "linux-64", "pytorch").version == "2.4.1"
    assert pick(lk, "linux-64", "cudatoolkit").version == "11.8.0"
    assert pick(lk, "linux-64", "bitsandbytes").build.startswith("cuda118_py311")
    assert pick(lk, "linux-64", "accelerate").version == "1.1.1"
    assert pick(lk, "linux-64", "numpy").version.startswith("1.")


def test_seed_2023_resolves_its_2023_set(cf, home, tmp_path):
    lk = locked(cf, ENVS, "seed-2023", tmp_path / "seed.conda-lock.yml")
    want = {"transformers": "4.27.2", "peft": "0.2.0", "accelerate": "0.17.1", "tokenizers": "0.13.3",
            "pytorch": "2.0.0", "evaluate": "0.4.0"}
    assert {n: pick(lk, "linux-64", n).version for n in want} == want
    assert pick(lk, "linux-64", "huggingface_hub").version.startswith("0.")
    pip = [e for e in lk.for_platform("linux-64") if e.manager == "pip"]
    assert [(e.name, e.version, e.filename) for e in pip] == [
        ("bitsandbytes", "0.41.2.post2", "bitsandbytes-0.41.2.post2-py3-none-any.whl")]


PIP_ONLY = """pip-dependencies: {policy}
channels: [conda-forge]
dependencies:
  - python 3.10.*
  - numpy <2
{extra}  - pip
  - pip:
      - {entry}
"""


def spec_envs(tmp_path, entry, policy="conda", extra=""):
    envs = envs_copy(tmp_path)
    (envs / "seed-2023.yml").write_text(PIP_ONLY.format(policy=policy, extra=extra, entry=entry))
    return envs


def test_a_pip_entry_whose_dependencies_the_conda_side_lacks(cf, home, tmp_path):
    envs = spec_envs(tmp_path, "transformers==4.27.2", extra="  - packaging\n  - pyyaml\n")
    res = do_lock(cf, envs, "seed-2023", tmp_path / "x.conda-lock.yml")
    assert res.returncode == 4, res.stderr
    assert "the conda side lacks what the pip entries need" in res.stderr
    assert "tokenizers 0.13.3 (needed by transformers: tokenizers!=0.11.3,<0.14,>=0.11.1)" in res.stderr
    assert "`tokenizers !=0.11.3,<0.14,>=0.11.1`" in res.stderr and "`huggingface_hub <1.0,>=0.11.0`" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.conda-lock.yml").exists()


def test_dependencies_the_conda_side_lacks_are_locked_when_the_spec_allows(cf, home, tmp_path):
    envs = spec_envs(tmp_path, "transformers==4.27.2", policy="lock", extra="  - packaging\n  - pyyaml\n")
    lk = locked(cf, envs, "seed-2023", tmp_path / "x.conda-lock.yml")
    pip = {e.name: e for e in lk.for_platform("linux-64") if e.manager == "pip"}
    assert pip["tokenizers"].version == "0.13.3" and pip["huggingface-hub"].version == "0.36.0"
    assert {"transformers", "regex", "requests", "filelock", "tqdm"} <= set(pip)
    assert not {"numpy", "packaging", "pyyaml"} & set(pip)  # the conda side provides them
    assert "manylinux" in pip["tokenizers"].filename and "cp310" in pip["tokenizers"].filename
    assert all(e.sha256 == fixture_sha(e.filename) for e in pip.values())


def test_a_wheel_the_profiles_oldest_machine_cannot_install(cf, home, tmp_path):
    envs = envs_copy(tmp_path, {"cpu.virtual-packages.yml": ('__glibc: "2.24"', '__glibc: "2.17"')})
    res = do_lock(cf, envs, "cpu", tmp_path / "x.conda-lock.yml", "--platform", "linux-64")
    assert res.returncode == 4, res.stderr
    assert "bitsandbytes 0.50.2 has no wheel that installs on every linux-64 machine" in res.stderr
    assert "__glibc >= 2.24" in res.stderr and "Raise the profile's minimum" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_silent_downgrade_to_an_older_wheel(cf, home, tmp_path):
    envs = spec_envs(tmp_path, "rouge-score", policy="lock", extra="  - absl-py\n  - nltk\n  - six\n")
    res = do_lock(cf, envs, "seed-2023", tmp_path / "x.conda-lock.yml")
    assert res.returncode == 4, res.stderr
    assert "would take 0.0.4, not the newest release 0.1.2" in res.stderr and "sdist" in res.stderr
    assert "Pin `rouge-score==0.0.4`" in res.stderr and "conda side" in res.stderr


@pytest.mark.parametrize("case,edits,platform,expect", [
    ("osx-too-old", {"cpu.virtual-packages.yml": ('__osx: "14.0"', '__osx: "11.0"'),
                     "cpu.yml": ("pytorch >=2.8 cpu*", "pytorch >=2.11 cpu*")}, "osx-arm64",
     "needs __osx >=12.0 (the macOS version) but the profile sets __osx=11.0"),
    ("no-cuda", {"cuda12.virtual-packages.yml": ('      __cuda: "12.0"\n', "")}, "linux-64",
     "needs __cuda * (the driver's CUDA version) and the profile's virtual packages"),
])
def test_a_failed_solve_keeps_the_whole_explanation_and_names_the_fix(cf, home, tmp_path, case, edits, platform,
                                                                      expect):
    envs = envs_copy(tmp_path, edits)
    profile = "cpu" if platform == "osx-arm64" else "cuda12"
    res = do_lock(cf, envs, profile, tmp_path / "x.conda-lock.yml", "--platform", platform)
    assert res.returncode == 4, res.stderr
    assert "for which no candidates were found" in res.stderr  # the leaf, not only the first line
    assert expect in res.stderr and "Relax" not in res.stderr and "relax" not in res.stderr


def _conda_only(lk, platform, out):
    """The lock's conda part for one platform (the transcribed packages carry no Python to run pip with)."""
    raw = dict(lk.raw)
    raw["package"] = [p for p in lk.raw["package"] if p["platform"] == platform and p["manager"] == "conda"]
    raw["metadata"] = dict(raw["metadata"], platforms=[platform])
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def test_the_cpu_lock_installs_with_the_embedded_engine(cf, home, tmp_path):
    lk = locked(cf, ENVS, "cpu", tmp_path / "cpu.conda-lock.yml", "--platform", "linux-64")
    lock_file = _conda_only(lk, "linux-64", tmp_path / "conda-only.conda-lock.yml")
    prefix = tmp_path / "env"
    answer = subproc.worker("locking.rattler_worker", {"op": "install", "lock": str(lock_file), "platform": "linux-64",
                                               "prefix": str(prefix), "cache_dir": str(tmp_path / "pkgs")},
                            timeout=300)
    assert answer.get("ok"), answer
    meta = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (prefix / "conda-meta").glob("*.json")}
    assert meta["pytorch"]["build"].startswith("cpu_mkl") and "bitsandbytes" not in meta
    assert len(meta) == len([e for e in lk.for_platform("linux-64") if e.manager == "conda"])


def test_the_arm_cuda13_lock_installs_with_the_embedded_engine(cf, home, tmp_path):
    # Linking needs no aarch64 CPU: the linux-aarch64 lock's conda part is installed here with py-rattler.
    lk = locked(cf, ENVS, "cuda13-aarch64", tmp_path / "arm.conda-lock.yml")
    lock_file = _conda_only(lk, "linux-aarch64", tmp_path / "conda-only.conda-lock.yml")
    prefix = tmp_path / "env"
    answer = subproc.worker("locking.rattler_worker", {"op": "install", "lock": str(lock_file),
                                                       "platform": "linux-aarch64", "prefix": str(prefix),
                                                       "cache_dir": str(tmp_path / "pkgs")}, timeout=300)
    assert answer.get("ok"), answer
    meta = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (prefix / "conda-meta").glob("*.json")}
    assert len(meta) == len([e for e in lk.for_platform("linux-aarch64") if e.manager == "conda"])
    assert meta["pytorch"]["build"].startswith("cuda130_generic") and meta["pytorch"]["subdir"] == "linux-aarch64"
    assert meta["arm-variant"]["build"] == "sbsa" and meta["libcublas"]["version"].startswith("13.")
    assert "bitsandbytes" not in meta
    # the files are there, each package's own
    assert (prefix / "share" / "lorastrap-cf" / "pytorch.source").read_text().startswith(
        "conda-forge/pytorch-cpu-feedstock")


@pytest.mark.skipif(not MICROMAMBA.exists(), reason="no micromamba at ../shared/tools/micromamba/bin")
def test_the_cpu_lock_installs_with_micromamba(cf, home, tmp_path):
    lk = locked(cf, ENVS, "cpu", tmp_path / "cpu.conda-lock.yml", "--platform", "linux-64")
    lock_file = _conda_only(lk, "linux-64", tmp_path / "conda-only.conda-lock.yml")
    prefix = tmp_path / "env"
    env = subproc.clean_env(prefixes=("CONDA", "MAMBA"), MAMBA_ROOT_PREFIX=str(tmp_path / "root"),
                            CONDA_PKGS_DIRS=str(tmp_path / "pkgs"))
    res = subproc.run([str(MICROMAMBA), "create", "-y", "--no-rc", "-p", str(prefix), "-f", str(lock_file)],
                      timeout=300, env=env)
    assert res.ok, res.tail(20)
    names = {json.loads(p.read_text())["name"] for p in (prefix / "conda-meta").glob("*.json")}
    assert "pytorch" in names and "cuda-version" not in names


def test_diff_locks_lists_what_changed(cf, home, tmp_path):
    old = locked(cf, ENVS, "cpu", tmp_path / "old.conda-lock.yml", "--platform", "linux-64")
    envs = envs_copy(tmp_path, {"cpu.yml": ("peft >=0.19", "peft 0.18.*")})
    locked(cf, envs, "cpu", tmp_path / "new.conda-lock.yml", "--platform", "linux-64")
    res = run_cli("diff-locks", str(tmp_path / "old.conda-lock.yml"), str(tmp_path / "new.conda-lock.yml"))
    assert res.returncode == 0, res.stderr
    assert "linux-64: 0 added, 0 removed, 1 changed" in res.stdout
    assert "~ peft 0.19.1 pyhd8ed1ab_0 -> 0.18.1 pyhd8ed1ab_0" in res.stdout
    res = run_cli("diff-locks", str(tmp_path / "none.conda-lock.yml"), str(tmp_path / "old.conda-lock.yml"), "--json")
    added = json.loads(res.stdout)["linux-64"]["added"]
    assert len(added) == len(old.for_platform("linux-64"))
    assert os.path.exists(tmp_path / "old.conda-lock.yml")


@pytest.mark.parametrize("filename,ok", [
    ("markupsafe-3.0.3-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("regex-2026.9.29-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", True),
    ("bitsandbytes-0.50.2-py3-none-manylinux_2_28_x86_64.whl", False),  # needs more than the profile's 2.24
    ("safetensors-0.7.0-cp38-abi3-manylinux_2_17_x86_64.whl", True),  # abi3 from 3.8 on
    ("tokenizers-0.13.3-cp310-cp310-manylinux_2_17_x86_64.whl", False),  # another Python
    ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_aarch64.whl", False),  # another CPU
])
def test_wheel_tags_against_the_profiles_minimums(filename, ok):
    assert wheels.wheel_installable(filename, "3.12", wheels.wheel_platforms("linux-64", {"__glibc": "2.24"})) is ok
