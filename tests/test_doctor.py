"""doctor and repair on environments broken for real (test channel, real engine, real pip)."""

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli
from recorded_nvml import RecordedNVML, load

from lorastrap.core import subproc
from lorastrap.machine.detect import build_machine
from lorastrap.machine.model import Host
from lorastrap.machine.nvml_probe import probe

TEST_ENVS = ROOT / "tests" / "envs"
CUDA = {"CONDA_OVERRIDE_CUDA": "12.4"}


def install(channel, prefix, env=None):
    res = run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "--prefix", str(prefix), env=env)
    assert res.returncode == 0, res.stderr
    return prefix


def doctor(prefix, *extra, env=None):
    res = run_cli("doctor", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--json", *extra, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def repair(channel, prefix, *extra, env=None):
    res = run_cli("repair", "--envs-dir", str(TEST_ENVS), "--prefix", str(prefix), "--yes", "--channel",
                  channel["url"], "--pip-index-url", channel["simple"], *extra, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def codes(report):
    return {f["code"] for f in report["findings"]}


def backup(prefix):
    return Path(str(prefix) + ".lorastrap-backup")


def healthy_after_repair(channel, prefix, *extra, env=None):
    res = repair(channel, prefix, *extra, env=env)
    assert res.returncode == 0, res.stderr
    rc, report = doctor(prefix, *[a for a in extra if a.startswith("--machine") or a.endswith(".json")], env=env)
    assert rc == 0 and report["verdict"] == "healthy", report["findings"]
    assert backup(prefix).exists() and (backup(prefix) / "conda-meta").is_dir()
    return report


@pytest.fixture
def env(channel, warm_home, tmp_path):
    return install(channel, tmp_path / "env")


def test_healthy_environment_has_no_findings(engine, env):
    rc, report = doctor(env)
    assert rc == 0 and report["verdict"] == "healthy" and report["findings"] == [], report["findings"]
    assert report["profile"] == "test-cpu" and report["lock"].endswith("conda-lock.yml")


def test_deleted_file(engine, channel, env):
    victim = next(env.glob("lib/python3*/site-packages/transformers/__init__.py"))
    victim.unlink()
    rc, report = doctor(env)
    assert rc == 11 and "missing-files" in codes(report)
    f = next(f for f in report["findings"] if f["code"] == "missing-files")
    assert f["what"].startswith("transformers:") and f["fix"]
    healthy_after_repair(channel, env)
    assert victim.exists()
    assert not (backup(env) / victim.relative_to(env)).exists()  # the backup is the environment as it was


def test_edited_file(channel, env):
    conf = env / "etc" / "torch.conf"
    conf.write_text(conf.read_text() + "tuned=1\n")
    rc, report = doctor(env)
    assert rc == 11 and "altered-files" in codes(report)
    healthy_after_repair(channel, env)
    assert "tuned" not in conf.read_text() and "tuned=1" in (backup(env) / "etc" / "torch.conf").read_text()


def test_removed_conda_meta_record(channel, env):
    next((env / "conda-meta").glob("peft-*.json")).unlink()
    rc, report = doctor(env)
    assert rc == 11 and "package-missing" in codes(report)
    assert any("peft" in f["what"] for f in report["findings"] if f["code"] == "package-missing")
    healthy_after_repair(channel, env)


def test_extra_and_missing_package_vs_the_lock(channel, env, tmp_path):
    lock = yaml.safe_load((env / "conda-meta" / "lorastrap" / "conda-lock.yml").read_text())
    res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cuda", "--platform", "linux-64",
                  "--channel", channel["url"], "-o", str(tmp_path / "cuda.conda-lock.yml"))
    assert res.returncode == 0, res.stderr
    cuda = yaml.safe_load((tmp_path / "cuda.conda-lock.yml").read_text())
    extra = [p for p in cuda["package"] if p["name"] == "libcublas" and p["platform"] == "linux-64"]
    lock["package"] = [p for p in lock["package"] if p["name"] != "tqdm" and p["manager"] == "conda"] + extra
    changed = tmp_path / "changed.conda-lock.yml"
    changed.write_text(yaml.safe_dump(lock))
    # The real engine changes the environment behind lorastrap's back: adds libcublas, removes tqdm.
    answer = subproc.worker("locking.rattler_worker", {"op": "install", "lock": str(changed), "platform": "linux-64",
                                               "prefix": str(env), "cache_dir": str(tmp_path / "rc")}, timeout=300)
    assert answer["ok"], answer
    rc, report = doctor(env)
    assert rc == 11
    assert {"package-missing", "package-extra"} <= codes(report)
    assert any("tqdm" in f["what"] for f in report["findings"] if f["code"] == "package-missing")
    assert any("libcublas" in f["what"] for f in report["findings"] if f["code"] == "package-extra")
    healthy_after_repair(channel, env)
    assert not list((env / "conda-meta").glob("libcublas-*.json"))


def _wheel(tmp_path, name, version, module_text):
    files = {f"{name}/__init__.py": module_text,
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t)}"
              for p, t in files.items()] + [f"{name}-{version}.dist-info/RECORD,,"]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = tmp_path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for p, t in files.items():
            z.writestr(p, t)
    return whl


def test_pip_installed_distribution_shadowing_a_conda_package(channel, env, tmp_path):
    whl = _wheel(tmp_path, "bitsandbytes", "9.9", '__version__ = "9.9"\n')
    site = next(env.glob("lib/python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--no-deps", "--upgrade", "--target",
                    str(site), str(whl)], check=True, capture_output=True)  # the classic `pip install -U` over conda
    rc, report = doctor(env)
    assert rc == 11 and "pip-shadows-conda" in codes(report)
    f = next(f for f in report["findings"] if f["code"] == "pip-shadows-conda")
    assert "bitsandbytes 9.9" in f["what"] and "conda package bitsandbytes" in f["what"]
    report = healthy_after_repair(channel, env)
    assert not list(site.glob("bitsandbytes-9.9.dist-info"))
    assert "9.9" not in (site / "bitsandbytes" / "__init__.py").read_text()


def machine_file(tmp_path, fixture):
    fx = load(ROOT / "tests" / "fixtures" / "nvml" / fixture)
    machine = build_machine(Host(**fx["host"]), probe(RecordedNVML(fx["nvml"])), fx["env"])
    path = tmp_path / "machine.json"
    path.write_text(machine.model_dump_json())
    return str(path)


def test_cuda12_environment_on_a_driver_that_says_11_4(channel, warm_home, tmp_path):
    prefix = install(channel, tmp_path / "env", env=CUDA)
    v100 = machine_file(tmp_path, "v100-sxm2_driver-470--cuda11.json")  # NVML: driver 470, CUDA 11.4
    rc, report = doctor(prefix, "--machine", v100)
    assert rc == 12 and report["verdict"] == "not-repairable"
    f = next(f for f in report["findings"] if f["code"] == "machine-driver_cuda_min")
    assert "CUDA >= 12.0" in f["what"] and "11.4" in f["what"] and "--replan" in f["fix"]
    res = repair(channel, prefix, "--replan", "--machine", v100)
    assert res.returncode == 0, res.stderr
    rc, report = doctor(prefix, "--machine", v100)
    assert rc == 0, report["findings"]
    assert report["profile"] == "test-cpu" and backup(prefix).exists()


def test_user_files_are_carried_over_and_kept(engine, channel, env):
    (env / "notebooks").mkdir()
    (env / "notebooks" / "run.ipynb").write_text("{}")
    (env / "etc" / "torch.conf").write_text("broken\n")
    rc, report = doctor(env)
    assert rc == 11 and "notebooks/run.ipynb" in report["unowned_files"]
    res = repair(channel, env)
    assert res.returncode == 0 and "carried over 1 file(s)" in res.stderr
    assert (env / "notebooks" / "run.ipynb").read_text() == "{}"
    assert (backup(env) / "notebooks" / "run.ipynb").exists()


def test_repair_killed_midway_leaves_the_original_restorable(channel, env):
    victim = env / "etc" / "torch.conf"
    victim.write_text("edited\n")
    full = dict(os.environ, LORASTRAP_PAUSE_AT="linked")
    proc = subprocess.Popen([sys.executable, "-m", "lorastrap", "repair", "--envs-dir", str(TEST_ENVS), "--prefix",
                             str(env), "--yes", "--channel", channel["url"]], cwd=ROOT, env=full,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "paused at linked" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (backup(env) / "etc" / "torch.conf").read_text() == "edited\n"  # the original, complete
    rc, report = doctor(env)
    assert "interrupted-transaction" in codes(report)
    res = repair(channel, env)  # restores the original first, then repairs it
    assert res.returncode == 0, res.stderr
    assert "restoring the previous environment" in res.stderr or "interrupted" in res.stderr
    rc, report = doctor(env)
    assert rc == 0, report["findings"]
    assert (backup(env) / "etc" / "torch.conf").read_text() == "edited\n"


def test_not_a_conda_environment(tmp_path):
    res = run_cli("doctor", "--prefix", str(tmp_path))
    assert res.returncode == 2 and "not a conda environment" in res.stderr
