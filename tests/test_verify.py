"""verify: scripts/verify_lora.py against real environments — the current stack, broken variants, the 2023 set."""

import contextlib
import json
import subprocess

import pytest
from conftest import ROOT, run_cli

SCRIPT = ROOT / "scripts" / "verify_lora.py"


def verify(prefix, *extra, env=None):
    res = run_cli("verify", "--prefix", str(prefix), "--json", *extra, env=env, timeout=600)
    assert "Traceback" not in res.stderr, res.stderr
    return res, json.loads(res.stdout)


def check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


@contextlib.contextmanager
def hidden(venv, *names):
    """Make packages of the real environment unimportable (moved aside), and put them back afterwards."""
    sp = next((venv / "lib").glob("python3*/site-packages"))
    moved = []
    try:
        for name in names:
            for p in list(sp.glob(name)) + list(sp.glob(f"{name}-*.dist-info")):
                p.rename(p.with_name(p.name + ".hidden"))
                moved.append(p)
        yield
    finally:
        for p in moved:
            p.with_name(p.name + ".hidden").rename(p)


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_current_stack_passes_and_matches_the_schema(ml_venv, tmp_path):
    res, report = verify(ml_venv, "--report", str(tmp_path / "r.json"))
    assert res.returncode == 0, json.dumps(report, indent=1)[:3000]
    assert report["verdict"] == "pass" and report["ok"]
    assert report["versions"]["transformers"] == "5.24.0" and report["versions"]["bitsandbytes"] == "0.50.2"
    load = check(report, "tiny Llama loads in 8 bits")
    assert load["int8_layers"] == 14 and load["relative_error"] < 0.1
    train = check(report, "LoRA trains (10 steps)")
    assert train["losses"][-1] < train["losses"][0] and train["trainable_params"] == 4096
    assert check(report, "LoRA adapter save and reload")["max_abs_diff"] <= 1e-5
    assert "cpu" in report["bitsandbytes"]["supported_devices"]
    assert report["bitsandbytes"]["native_library"]
    assert json.loads((tmp_path / "r.json").read_text()) == report
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads((ROOT / "envs/schemas/verify-report.schema.json").read_text()))


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_human_summary(ml_venv):
    res = run_cli("verify", "--prefix", str(ml_venv), timeout=600)
    assert res.returncode == 0
    assert "verdict: PASS" in res.stdout and "[  ok] LoRA trains" in res.stdout


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_is_deterministic(ml_venv):
    a = subprocess.run([str(ml_venv / "bin/python"), str(SCRIPT), "--json"], capture_output=True, text=True)
    b = subprocess.run([str(ml_venv / "bin/python"), str(SCRIPT), "--json"], capture_output=True, text=True)
    la = check(json.loads(a.stdout), "LoRA trains (10 steps)")["losses"]
    lb = check(json.loads(b.stdout), "LoRA trains (10 steps)")["losses"]
    assert la == lb


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_accelerate_missing(ml_venv):
    with hidden(ml_venv, "accelerate"):
        res, report = verify(ml_venv)
    assert res.returncode == 9 and report["verdict"] == "fail"
    c = check(report, "import accelerate")
    assert c["status"] == "fail" and "requires accelerate" in c["error"] and "accelerate>=1.1.0" in c["error"]
    assert c["fix"]
    assert "tiny Llama loads in 8 bits" not in [x["name"] for x in report["checks"]]


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_peft_missing(ml_venv):
    with hidden(ml_venv, "peft"):
        res, report = verify(ml_venv)
    assert res.returncode == 9
    c = check(report, "import peft")
    assert c["status"] == "fail" and "No module named 'peft'" in c["detail"] and "repair" in c["fix"]


@pytest.mark.slow  # builds the ML venv (torch, transformers, peft, accelerate, bitsandbytes)
def test_bitsandbytes_older_than_transformers_requires(ml_venv, tmp_path_factory):
    old = tmp_path_factory.mktemp("old-bnb")
    subprocess.run([str(ml_venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--target", str(old), "bitsandbytes==0.45.5"], check=True, timeout=600)
    # An older bitsandbytes first on the path shadows the environment's (as a stray pip install would).
    pth = next((ml_venv / "lib").glob("python3*/site-packages")) / "zz_old_bnb.pth"
    pth.write_text(str(old) + "\n")
    sp = next((ml_venv / "lib").glob("python3*/site-packages"))
    try:
        with hidden(ml_venv, "bitsandbytes"):
            res, report = verify(ml_venv)
    finally:
        pth.unlink()
    assert report["versions"]["bitsandbytes"] == "0.45.5", report["versions"]
    assert res.returncode == 9
    c = check(report, "transformers accepts bitsandbytes")
    assert c["status"] == "fail"
    assert "requires bitsandbytes: pip install -U bitsandbytes>=0.46.1" in c["error"]
    assert "older than the 0.46.1" in c["cause"]
    assert sp.exists()


@pytest.mark.slow  # builds the 2023 venv, which the explain tests (slow tier) share
def test_2023_set_missing_setuptools_and_scipy_then_cuda_only(venv_2023):
    py = str(venv_2023 / "bin/python")
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools", "scipy"], capture_output=True)
    res, report = verify(venv_2023)
    assert res.returncode == 9 and report["verdict"] == "fail"
    causes = " ".join(c.get("cause", "") + c.get("fix", "") for c in report["checks"] if c["status"] == "fail")
    assert "setuptools<81" in causes
    assert "scipy" in causes
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "setuptools<81", "scipy"],
                   check=True, timeout=900)
    res, report = verify(venv_2023)
    assert res.returncode == 3, json.dumps(report, indent=1)[:2000]
    assert report["verdict"] == "unsupported"
    assert "CUDA-only" in report["unsupported_reason"] and "CPU-only machine" in report["unsupported_reason"]
    assert report["versions"]["bitsandbytes"] == "0.41.2.post2"


def test_gpu_report_fixture_parses():
    """A report from a real GPU machine, when one was recorded (tests/fixtures/verify/*.json)."""
    from lorastrap.install import verify as v
    fixtures = sorted((ROOT / "tests" / "fixtures" / "verify").glob("*.json"))
    if not fixtures:
        pytest.skip("no recorded GPU verification report (tests/fixtures/verify/)")
    for path in fixtures:
        report = v.parse(path.read_text())
        assert report and report["device"] == "cuda" and report["torch"]["cuda_available"]
