"""explain and doctor on pip venvs broken the way users break them: the real import or load gives the real error,
`lorastrap explain` given that text and that venv names the cause, and doctor (run by explain on the same venv, and
on its own for some) finds it.

The venvs are cheap overlays of the session's real ones (ml_venv: the current stack; venv_2023: the article's pins):
a new venv whose site-packages links every entry of the base's, minus the packages a case removes, plus packages
installed with `pip install --no-deps --target` (an older accelerate, another setuptools, scipy).
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from lorastrap.care import explain

# Real venvs broken a dozen ways: the slow tier (`sh scripts/test.sh -m slow`; .ci/run runs both tiers).
pytestmark = pytest.mark.slow

RECORDED = ROOT / "tests" / "fixtures" / "explain" / "recorded.json"

# Each snippet runs in the broken environment; its traceback (and warnings) is the text a user would paste.
SNIPPETS = {
    "load-8bit": """
import os, sys, torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
path = sys.argv[2]
if not os.path.isdir(path):
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=16)).save_pretrained(path)
LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
""",
    "code-errors": """
import sys, traceback
for code in ("from peft import prepare_model_for_int8_training",
             "from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained(sys.argv[2], load_in_8bit=True)"):
    try:
        exec(code)
    except Exception:
        traceback.print_exc()
sys.exit(1)
""",
    "load-8bit-2023": """
import os, sys
from transformers import GPT2Config, GPT2LMHeadModel
path = sys.argv[2]
if not os.path.isdir(path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(path)
GPT2LMHeadModel.from_pretrained(path, load_in_8bit=True, **eval(sys.argv[3] if len(sys.argv) > 3 else "{}"))
""",
    "import-accelerate": "import accelerate\n",
    "import-bitsandbytes": "import bitsandbytes\n",
    "to-cuda": "import torch\ntorch.zeros(1).cuda()\n",
}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def overlay(base: Path, dest: Path, drop=(), add=()) -> Path:
    """A venv on BASE's interpreter whose site-packages links BASE's entries minus DROP, then the entries of ADD."""
    subprocess.run([str(base / "bin" / "python"), "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120)
    sp = next((dest / "lib").glob("python3*/site-packages"))
    base_sp = next((base / "lib").glob("python3*/site-packages"))
    dropped = {norm(d) for d in drop}
    for src in (base_sp, *add):
        for entry in src.iterdir():
            top = norm(entry.name.split("-")[0].removesuffix(".py").removesuffix(".pth"))
            if (src == base_sp and top in dropped) or entry.name in ("__pycache__", "bin"):
                continue
            (sp / entry.name).unlink(missing_ok=True)
            (sp / entry.name).symlink_to(entry)
    return dest


def reproduce(venv: Path, snippet: str, *args: str) -> str:
    """Run SNIPPET in VENV as a user would and return what it printed; it must fail."""
    res = subprocess.run([str(venv / "bin" / "python"), "-c", SNIPPETS[snippet], snippet, *args],
                         capture_output=True, text=True, timeout=600, cwd=venv)
    assert res.returncode != 0, f"{snippet} did not fail in {venv}: {res.stdout[-500:]}"
    return res.stdout + res.stderr


def explain_in(venv: Path, text: str) -> tuple[int, dict]:
    res = run_cli("explain", "--prefix", str(venv), "--json", "-", timeout=600, input=text)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def cause_of(result: dict, entry: str) -> str | None:
    e = next((e for e in result["errors"] if e["id"] == entry), None)
    assert e is not None, [x["id"] for x in result["errors"]]
    return e["cause"]["id"] if e["cause"] else None


def findings(result: dict) -> str:
    return "\n".join(f"{f['code']}: {f['what']} | {f['why']} | {f['fix']}" for f in result["doctor"]["findings"])


@pytest.fixture(scope="session")
def targets(tmp_path_factory):
    """Packages installed once with --no-deps --target, each in its own folder (an overlay links them in)."""
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for key, spec in (("accelerate-0.26", "accelerate==0.26.1"), ("setuptools-81", "setuptools==81.0.0"),
                      ("setuptools-84", "setuptools==84.0.0"), ("scipy", "scipy==1.17.1")):
        out[key] = root / key
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-compile", "--target", str(out[key]), spec], check=True, capture_output=True, timeout=900)
    return out


@pytest.fixture(scope="session")
def tiny(ml_venv, tmp_path_factory):
    """A folder for tiny random models: a Llama saved by the current stack (the 2023 snippet saves its GPT-2)."""
    out = tmp_path_factory.mktemp("models")
    save = SNIPPETS["load-8bit"].split("LlamaForCausalLM.from_pretrained(")[0]
    subprocess.run([str(ml_venv / "bin" / "python"), "-c", save, "save", str(out / "llama")], check=True,
                   capture_output=True, timeout=600)
    return out


SETUPTOOLS = ("setuptools", "pkg_resources", "_distutils_hack", "distutils")


# --------------------------------------------------------------------------------------------------------------
# The current stack (transformers 5.x)

@pytest.mark.parametrize("drop, cause", [("accelerate", "accelerate-missing"), ("bitsandbytes", "bitsandbytes-missing")])
def test_current_stack_without_a_package(ml_venv, tmp_path, tiny, drop, cause):
    venv = overlay(ml_venv, tmp_path / "venv", drop=[drop])
    text = reproduce(venv, "load-8bit", str(tiny / "llama"))
    assert f"requires {drop}" in text
    rc, result = explain_in(venv, text)
    assert rc == 0 and cause_of(result, "load-in-8bit-requires") == cause
    assert result["environment"]["packages"].get(drop) is None
    assert f"import {drop}" in findings(result) and result["doctor"]["exit_code"] == 11
    assert "lorastrap repair" not in findings(result)


def test_accelerate_too_old_for_transformers(ml_venv, tmp_path, tiny, targets):
    venv = overlay(ml_venv, tmp_path / "venv", drop=["accelerate"], add=[targets["accelerate-0.26"]])
    text = reproduce(venv, "load-8bit", str(tiny / "llama"))
    assert "requires accelerate" in text and "'accelerate>=1.1.0'" in text
    rc, result = explain_in(venv, text)
    assert cause_of(result, "load-in-8bit-requires") == "accelerate-too-old"
    assert result["environment"]["packages"]["accelerate"] == "0.26.1"
    assert "transformers accepts accelerate" in findings(result)
    assert "older than the 1.1.0" in findings(result)


def test_healthy_stack_and_errors_of_the_code(ml_venv, tiny):
    """A healthy venv, and errors that come from the code (APIs removed): explain names them, doctor finds nothing."""
    text = reproduce(ml_venv, "code-errors", str(tiny / "llama"))
    assert "prepare_model_for_int8_training" in text and "unexpected keyword argument 'load_in_8bit'" in text
    rc, result = explain_in(ml_venv, text)
    assert rc == 0 and cause_of(result, "peft-int8-training-removed") == "peft-0-10-or-newer"
    assert cause_of(result, "load-in-8bit-keyword") == "transformers-5"
    assert result["doctor"]["verdict"] == "healthy" and result["doctor"]["findings"] == []


def test_doctor_by_interpreter_on_a_healthy_venv(ml_venv):
    res = run_cli("doctor", "--python", str(ml_venv / "bin" / "python"), "--json", timeout=600)
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["verdict"] == "healthy" and report["findings"] == [], report["findings"]
    assert report["kind"] == "venv" and report["versions"]["transformers"] == "5.24.0"
    assert report["python"] == str(ml_venv / "bin" / "python") and report["prefix"] == str(ml_venv)


# --------------------------------------------------------------------------------------------------------------
# The 2023 article's pins

@pytest.fixture(scope="session")
def y2023(venv_2023, targets, tmp_path_factory):
    """The 2023 set made importable as the article's readers had it: setuptools < 82 (pkg_resources) and scipy."""
    return overlay(venv_2023, tmp_path_factory.mktemp("y2023") / "venv", drop=SETUPTOOLS + ("scipy",),
                   add=[targets["setuptools-81"], targets["scipy"]])


@pytest.mark.parametrize("drop, cause", [("accelerate", "accelerate-missing"), ("bitsandbytes", "bitsandbytes-missing")])
def test_the_articles_error_and_its_two_causes(venv_2023, targets, tmp_path, tiny, drop, cause):
    venv = overlay(venv_2023, tmp_path / "venv", drop=SETUPTOOLS + ("scipy", drop),
                   add=[targets["setuptools-81"], targets["scipy"]])
    text = reproduce(venv, "load-8bit-2023", str(tiny / "gpt2"))
    assert "Using `load_in_8bit=True` requires Accelerate: `pip install accelerate` and the latest version of" in text
    rc, result = explain_in(venv, text)
    assert rc == 0 and cause_of(result, "load-in-8bit-requires") == cause
    assert f"import {drop}" in findings(result)
    assert explain.explain(text, table=explain.load())["errors"][0]["causes"], "without an environment: all causes"


def test_setuptools_too_new_for_the_2023_set(venv_2023, targets, tmp_path):
    venv = overlay(venv_2023, tmp_path / "venv", drop=SETUPTOOLS, add=[targets["setuptools-84"]])
    text = reproduce(venv, "import-accelerate")
    assert "No module named 'pkg_resources'" in text
    rc, result = explain_in(venv, text)
    assert cause_of(result, "pkg-resources-missing") == "setuptools-too-new"
    assert "pkg_resources" in findings(result)
    res = run_cli("doctor", "--prefix", str(venv), timeout=600)  # doctor alone, as a user runs it
    assert res.returncode == 11 and "import accelerate" in res.stdout and "setuptools<81" in res.stdout
    assert "verdict: repairable" in res.stdout and "stack: torch 2.13.0" in res.stdout


def test_old_bitsandbytes_without_scipy(venv_2023, targets, tmp_path):
    venv = overlay(venv_2023, tmp_path / "venv", drop=SETUPTOOLS + ("scipy",), add=[targets["setuptools-81"]])
    text = reproduce(venv, "import-bitsandbytes")
    assert "No module named 'scipy" in text
    rc, result = explain_in(venv, text)
    assert cause_of(result, "scipy-missing-for-bnb") == "old-bitsandbytes-needs-scipy"
    assert "scipy" in findings(result)


def test_cuda_only_bitsandbytes_on_a_cpu_machine(y2023, tiny):
    """One training log with two known failures: the CPU-only library warning and the offload refusal."""
    text = reproduce(y2023, "load-8bit-2023", str(tiny / "gpt2"), "{'device_map': 'auto'}")
    assert "compiled without GPU support" in text and "Some modules are dispatched on the CPU" in text
    cuda = reproduce(y2023, "to-cuda")
    assert "Torch not compiled with CUDA enabled" in cuda
    rc, result = explain_in(y2023, text + cuda)
    assert cause_of(result, "bnb-compiled-without-gpu") == "no-gpu"
    assert cause_of(result, "int8-cpu-offload") == "torch-sees-no-gpu"
    assert cause_of(result, "torch-not-compiled-with-cuda") == "cuda-only-bitsandbytes-without-gpu"
    assert result["doctor"]["exit_code"] == 12 and "precheck-unsupported" in findings(result)


# --------------------------------------------------------------------------------------------------------------
# What a CPU cannot reproduce: recorded environment descriptions from public reports

def recorded():
    return json.loads(RECORDED.read_text())["cases"]


@pytest.mark.parametrize("case", recorded(), ids=lambda c: f"{c['entry']}/{c['cause']}")
def test_recorded_environment(case):
    facts = explain.Facts.model_validate(case["facts"])
    assert facts.source and facts.source.startswith("https://")
    result = explain.explain(case["text"], table=explain.load(), facts=facts)
    assert cause_of(result, case["entry"]) == case["cause"]


def test_every_table_entry_is_tested():
    """Each entry of the table is the expected answer of some test: a report of the corpus
    (tests/fixtures/explain/corpus, test_explain_corpus), a recorded case, or a `cause_of(result, ID)` assertion in
    this file (read from its source, so an entry whose test is deleted fails here)."""
    asserted = {node.args[1].value for node in ast.walk(ast.parse(Path(__file__).read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "cause_of" and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)}
    corpus = ROOT / "tests" / "fixtures" / "explain" / "corpus"
    expected = (yaml.safe_load(p.read_text())["expect"] for p in corpus.glob("*.yaml"))
    in_corpus = {x["error"] for expect in expected if expect != "unknown" for x in expect}
    untested = {e.id for e in explain.load().errors} - asserted - in_corpus - {c["entry"] for c in recorded()}
    assert not untested, f"table entries no test expects: {sorted(untested)}"


# --------------------------------------------------------------------------------------------------------------
# The command line

def test_unknown_error_says_so_and_runs_doctor(ml_venv, tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 1 loss 2.3\nRuntimeError: something nobody has seen\n")
    res = run_cli("explain", "--python", str(ml_venv / "bin" / "python"), str(log), timeout=600)
    assert res.returncode == 15, res.stderr
    assert "unknown error" in res.stdout and "verdict: healthy" in res.stdout


def test_explain_without_an_environment_lists_the_causes():
    res = run_cli("explain", "--no-env", "ImportError: Using `load_in_8bit=True` requires Accelerate: "
                  "`pip install accelerate` and the latest version of bitsandbytes")
    assert res.returncode == 0
    assert "accelerate is not installed" in res.stdout and "bitsandbytes is not installed" in res.stdout
    assert "pass --prefix or --python" in res.stdout


@pytest.mark.parametrize("args, code, words", [
    ([], 2, "no error text"),
    (["--python", "/nonexistent/python", "x"], 2, "not an executable Python"),
    (["--facts", "/nonexistent.json", "x"], 2, "--facts /nonexistent.json cannot be read"),
])
def test_bad_input(args, code, words):
    res = run_cli("explain", *args, input="")
    assert res.returncode == code and words in res.stderr and "Traceback" not in res.stderr


def test_doctor_on_a_folder_without_python(tmp_path):
    res = run_cli("doctor", "--prefix", str(tmp_path))
    assert res.returncode == 2 and "nor any other Python environment" in res.stderr


def test_repair_refuses_a_venv(ml_venv):
    res = run_cli("repair", "--prefix", str(ml_venv), "--yes")
    assert res.returncode == 2 and "not a conda environment" in res.stderr and "lorastrap install" in res.stderr


def test_table_rejects_a_bad_entry(tmp_path):
    bad = tmp_path / "envs"
    bad.mkdir()
    (bad / "known-errors.yaml").write_text("schema_version: 1\nerrors:\n- id: x\n  title: t\n  source: s\n"
                                           "  signatures: ['(']\n  causes: [{id: c, why: w, fix: f, source: s}]\n")
    with pytest.raises(Exception) as info:
        explain.load(bad)
    assert "signatures" in str(info.value) and getattr(info.value, "exit_code", None) == 4
