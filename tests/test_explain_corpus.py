"""`lorastrap explain` on error reports copied from public trackers (tests/fixtures/explain/corpus/, one YAML file
per report: the text as posted, its address, the versions the thread names, the cause and fix its maintainers or
accepted answer established, and the verdict expected of explain).

Each report is explained in-process, with the text alone, as a user pastes it, and scored:
- right: explain names exactly the expected failures and, for each, either says the established cause (decided by
  what the text shows, or because it is the only cause left) or narrows it to at most three causes including the
  established one and gives the one command that tells them apart;
- honest unknown: a report outside the table, answered "unknown";
- missed: a failure the table covers answered "unknown", or named with its cause left open (no decision, no
  question that separates the causes);
- wrong: a failure the thread does not show, a cause other than the established one, or the established cause
  ruled out.

`python tests/test_explain_corpus.py` prints the score and each report's verdict.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "explain" / "corpus"
sys.path.insert(0, str(ROOT / "installer"))

from lorastrap.care import explain  # noqa: E402

MAX_OPEN = 3  # the most causes an answer may leave open and still count as right (with its question)


def reports() -> list[tuple[str, dict]]:
    return [(p.stem, yaml.safe_load(p.read_text())) for p in sorted(CORPUS.glob("*.yaml"))]


def classify(report: dict, result: dict) -> tuple[str, str]:
    """(verdict, detail) for one report: right, right-asked, honest, missed, wrong."""
    found = {e["id"]: e for e in result["errors"]}
    if report["expect"] == "unknown":
        return ("honest", "unknown") if not found else ("wrong", f"named {sorted(found)} for an error outside the table")
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
        if remaining == [cause]:  # the only cause it lists is the established one
            verdicts.append("right")
            details.append(f"{error}: only {cause}")
        elif cause not in remaining:
            verdicts.append("wrong")
            details.append(f"{error}: left {remaining}, established {cause}")
        elif item.get("ask") and len(remaining) <= MAX_OPEN:
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


def score(table=None) -> tuple[list[tuple[str, str, str]], Counter]:
    table = table or explain.load()
    rows = []
    counts = Counter()
    for name, report in reports():
        result = explain.explain(report["text"], table=table)
        verdict, detail = classify(report, result)
        rows.append((name, verdict, detail))
        counts[verdict] += 1
        counts["failures named"] += failures_named(report, result)
    return rows, counts


def summary(counts: Counter) -> str:
    n = sum(v for k, v in counts.items() if k != "failures named")
    right = counts["right"] + counts["right-asked"]
    return (f"{n} reports: right {right} ({counts['right']} decided, {counts['right-asked']} narrowed with a question), "
            f"honest unknown {counts['honest']}, missed {counts['missed']}, wrong {counts['wrong']}; "
            f"right or honest {100 * (right + counts['honest']) / n:.1f} %; "
            f"at the failure level (the right failures named, causes aside) {counts['failures named']}")


# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, report", reports(), ids=lambda x: x if isinstance(x, str) else "")
def test_report_is_well_formed(name, report):
    table = {e.id: {c.id for c in e.causes} for e in explain.load().errors}
    assert set(report) == {"source", "title", "versions", "established", "expect", "text"}, name
    assert report["source"].startswith("https://github.com/"), report["source"]
    assert report["text"].strip() and report["established"].strip()
    if report["expect"] != "unknown":
        for x in report["expect"]:
            assert x["error"] in table, x
            assert x["cause"] in table[x["error"]], x


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
