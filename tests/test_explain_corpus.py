"""`lorastrap explain` on error reports copied from public trackers (tests/fixtures/explain/corpus/, one YAML file
per report: the text as posted, its address, the versions the thread names, the cause and fix its maintainers or
accepted answer established, and the verdict expected of explain).

Each report is explained in-process, with the text alone, as a user pastes it, and scored:
- right: explain names exactly the expected failures and, for each, either says the established cause (decided by
  what the text shows, or because it is the only cause left) or lists the established one among its first three
  and gives the one command that tells the causes apart;
- honest unknown: a report outside the table, answered "unknown";
- missed: a failure the table covers answered "unknown", or named with its cause left open (no decision, no
  question that separates the causes);
- wrong: a failure the thread does not show, a cause other than the established one, or the established cause
  ruled out.

`python tests/test_explain_corpus.py` prints the score and each report's verdict.
"""

import functools
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "explain" / "corpus"
sys.path.insert(0, str(ROOT / "installer"))

from lorastrap.care import explain  # noqa: E402

MAX_OPEN = 3  # an open answer counts as right when the established cause is among its first three (and it asks)


@functools.cache
def table() -> explain.Table:
    return explain.load()


def reports() -> list[tuple[str, dict]]:
    return [(p.stem, yaml.safe_load(p.read_text())) for p in sorted(CORPUS.glob("*.yaml"))]


def classify(report: dict, result: dict) -> tuple[str, str]:
    """(verdict, detail) for one report: right, right-asked, honest, missed, wrong."""
    found = {e["id"]: e for e in result["errors"]}
    if report["expect"] == "unknown":
        if not found:
            return "honest", "unknown"
        return "wrong", f"named {sorted(found)} for an error outside the table"
    want = {x["error"]: x["cause"] for x in report["expect"]}
    extra = sorted(set(found) - set(want))
    if extra:
        return "wrong", f"named {extra}, which the thread does not show"
    verdicts, details = [], []
    for error, cause in want.items():
        item = found.get(error)
        if item is None:
            verdicts.append("missed")
            details.append(f"{error}: not recognised")
            continue
        decided = item.get("cause")
        if decided:
            ok = decided["id"] == cause
            verdicts.append("right" if ok else "wrong")
            details.append(f"{error}: said {decided['id']}" + ("" if ok else f", established {cause}"))
            continue
        remaining = [c["id"] for c in item.get("causes", [])]
        if item.get("ruled_out"):  # the text ruled every cause out, the established one too
            verdicts.append("wrong")
            details.append(f"{error}: every cause ruled out, established {cause}")
        elif remaining == [cause]:  # the only cause it lists is the established one
            verdicts.append("right")
            details.append(f"{error}: only {cause}")
        elif cause not in remaining:
            verdicts.append("wrong")
            details.append(f"{error}: left {remaining}, established {cause}")
        elif item.get("ask") and cause in remaining[:MAX_OPEN]:
            verdicts.append("right-asked")
            details.append(f"{error}: {cause} among {remaining}, asks")
        else:
            verdicts.append("missed")
            details.append(f"{error}: cause left open among {len(remaining)}")
    for v in ("wrong", "missed", "right-asked"):
        if v in verdicts:
            return v, "; ".join(details)
    return "right", "; ".join(details)


def failures_named(report: dict, result: dict) -> bool:
    """The failure level only: explain names exactly the expected failures (or none, for a report outside)."""
    want = set() if report["expect"] == "unknown" else {x["error"] for x in report["expect"]}
    return {e["id"] for e in result["errors"]} == want


def score() -> tuple[list[tuple[str, str, str]], Counter]:
    rows = []
    counts = Counter()
    for name, report in reports():
        result = explain.explain(report["text"], table=table())
        verdict, detail = classify(report, result)
        rows.append((name, verdict, detail))
        counts[verdict] += 1
        counts["failures named"] += failures_named(report, result)
    return rows, counts


def summary(counts: Counter) -> str:
    n = sum(v for k, v in counts.items() if k != "failures named")
    right = counts["right"] + counts["right-asked"]
    return (f"{n} reports: right {right} ({counts['right']} decided, "
            f"{counts['right-asked']} narrowed with a question), "
            f"honest unknown {counts['honest']}, missed {counts['missed']}, wrong {counts['wrong']}; "
            f"right or honest {100 * (right + counts['honest']) / n:.1f} %; "
            f"at the failure level (the right failures named, causes aside) {counts['failures named']}")


# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, report", reports(), ids=lambda x: x if isinstance(x, str) else "")
def test_report_is_well_formed(name, report):
    causes = {e.id: {c.id for c in e.causes} for e in table().errors}
    assert set(report) == {"source", "title", "versions", "established", "expect", "text"}, name
    assert report["source"].startswith("https://github.com/"), report["source"]
    assert report["text"].strip() and report["established"].strip()
    if report["expect"] != "unknown":
        for x in report["expect"]:
            assert x["error"] in causes, x
            assert x["cause"] in causes[x["error"]], x


def test_corpus_size_and_spread():
    rs = reports()
    unknown = [n for n, r in rs if r["expect"] == "unknown"]
    assert len(rs) >= 60 and len(unknown) >= 10
    assert len({r["source"] for _, r in rs}) == len(rs), "one report per thread"


def test_score():
    rows, counts = score()
    wrong = [f"{n}: {d}" for n, v, d in rows if v == "wrong"]
    assert not wrong, "\n".join(wrong)
    n = len(rows)
    assert counts["right"] + counts["right-asked"] + counts["honest"] >= 0.95 * n, summary(counts)


if __name__ == "__main__":
    rows, counts = score()
    for name, verdict, detail in rows:
        print(f"{verdict:12} {name:48} {detail}")
    print(summary(counts))


# --------------------------------------------------------------------------------------------------------------
# What the answers must and must not say (the failures the corpus was gathered for)

def explained(text: str, error: str) -> dict:
    result = explain.explain(text, table=table())
    return next(e for e in result["errors"] if e["id"] == error)


def test_an_extension_without_this_gpu_is_not_answered_with_a_torch_upgrade():
    text = ("RuntimeError: CUDA error: no kernel image is available for execution on the device "
            "(at /home/ubuntu/nunchaku/src/kernels/awq/gemv_awq.cu:311)\nDevice: NVIDIA A100-SXM4-40GB")
    e = explained(text, "no-kernel-image")
    assert e["cause"]["id"] == "extension-lacks-this-gpu"
    assert "do not upgrade or reinstall torch" in e["cause"]["fix"]


def test_the_gpu_the_text_names_orders_the_causes():
    new = explained("NVIDIA GeForce RTX 5090 with CUDA capability sm_120 is not compatible with the current PyTorch "
                    "installation.", "torch-arch-not-in-build")
    assert new["cause"]["id"] == "gpu-newer-than-build" and "cu128" in new["cause"]["fix"]
    old = explained("NVIDIA GeForce GTX 1080 Ti with CUDA capability sm_61 is not compatible with the current PyTorch "
                    "installation.\nThe current PyTorch install supports CUDA capabilities sm_75 sm_80 sm_86 sm_90 "
                    "sm_100 sm_120.", "torch-arch-not-in-build")
    assert old["cause"]["id"] == "gpu-older-than-build" and "cu126" in old["cause"]["fix"]
    # a bare "no kernel image" on a GPU the text names as old: the old-GPU cause, with what showed it
    e = explained("Tesla K80\nRuntimeError: CUDA error: no kernel image is available for execution on the device",
                  "no-kernel-image")
    assert e["cause"]["id"] == "old-gpu" and any("3.7" in b for b in e["cause"]["because"])


def test_windows_gets_the_windows_fix():
    text = ("CUDA_SETUP: WARNING! libcudart.so not found in any environmental path. "
            "Searching /usr/local/cuda/lib64...\n"
            "CUDA SETUP: Loading binary D:\\kohya\\venv\\lib\\site-packages\\bitsandbytes\\libbitsandbytes_cpu.so...")
    for error in ("bnb-libcudart-not-found", "bnb-compiled-without-gpu"):
        c = explained(text, error)["cause"]
        assert c["id"] == "windows-before-0-43" and "0.43" in c["fix"] and "does nothing on Windows" in c["fix"]
    linux = explained(text.replace("D:\\kohya\\venv\\lib\\site-packages\\", "/home/u/venv/lib/python3.10/"
                                   "site-packages/").replace("\\", "/"), "bnb-libcudart-not-found")
    assert linux["cause"]["id"] == "old-bitsandbytes-searches-libcudart" and "LD_LIBRARY_PATH" in linux["cause"]["fix"]


def test_without_evidence_the_causes_come_with_the_command_that_tells_them_apart():
    e = explained("ImportError: Using `load_in_8bit=True` requires Accelerate: `pip install accelerate` and the latest "
                  "version of bitsandbytes", "load-in-8bit-requires")
    assert e["cause"] is None and len(e["causes"]) == 6 and "torch.cuda.is_available()" in e["ask"]
    text = explain.format_explanation({"known": True, "errors": [e]})
    assert "to tell them apart, run:" in text and "pass --prefix or --python" in text


def test_reformatted_text_still_matches():
    boxed = ("│   21 │   │   CUDA Setup failed despite GPU being available. Please run the f │\n"
             "[rank0]: RuntimeError:\n[rank0]:         CUDA Setup failed despite GPU\n[rank0]:  being available.")
    assert explained(boxed, "bnb-cuda-setup-failed")["cause"]["id"] == "old-bitsandbytes-cuda-search"
    assert explain.flatten("a │ b\r\n[rank1]: c\\d") == "a b c/d"


def test_every_upgrade_names_the_version_that_fixes_it():
    for e in table().errors:
        for c in e.causes:
            for m in re.finditer(r"pip install -U '?([\w-]+)", c.fix):
                rest = c.fix[m.start():m.start() + 60]
                assert re.search(r"[<>=]=?\s*\d", rest), f"{e.id}/{c.id}: {rest}"


def _venv(root: Path, packages: tuple[str, ...]) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").symlink_to(sys.executable)
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    sp = root / "lib" / "python3.12" / "site-packages"
    sp.mkdir(parents=True)
    for name in packages:
        (sp / f"{name}-1.0.dist-info").mkdir()
    return root


def test_active_environment(tmp_path):
    stack = _venv(tmp_path / "train", ("torch", "transformers"))
    bare = _venv(tmp_path / "bare", ("requests",))
    never = lambda name, path=None: None  # noqa: E731 (no python on PATH)
    assert explain.active_environment({"VIRTUAL_ENV": str(stack)}, which=never)[:2] == (stack, None)
    assert explain.active_environment({"CONDA_PREFIX": str(stack)}, which=never)[2].endswith("($CONDA_PREFIX)")
    assert explain.active_environment({"VIRTUAL_ENV": str(bare)}, which=never) is None  # no stack: not the one
    on_path = lambda name, path=None: str(stack / "bin" / "python") if name == "python" else None  # noqa: E731
    found = explain.active_environment({"VIRTUAL_ENV": str(bare), "PATH": str(stack / "bin")}, which=on_path)
    assert found[1] == stack / "bin" / "python" and "python on PATH" in found[2]
    line = explain.format_explanation({"known": False, "errors": [], "environment_from": f"{found[2]}: x"})
    assert line.startswith("environment: the python on PATH") and "--no-env" in line
