"""Regenerate what is derived from code and data: the JSON schemas in envs/schemas/ and the README's support table.

    python scripts/gen_docs.py          # write them
    python scripts/gen_docs.py --check  # exit 1 if any is out of date (the tests do the same)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "installer"))

from lorastrap.machine import model  # noqa: E402
from lorastrap.care import explain  # noqa: E402
from lorastrap.matrix import plan, profiles  # noqa: E402
from lorastrap.core import records  # noqa: E402

TABLE_START, TABLE_END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def schemas() -> dict[Path, str]:
    out = {}
    for name, schema in (("profiles", profiles.json_schema()), ("known-errors", explain.json_schema()),
                         ("machine", model.Machine.model_json_schema()),
                         ("plan", plan.Plan.model_json_schema()),
                         *((n, m.model_json_schema()) for n, m in records.SCHEMAS.items())):
        schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
        out[ROOT / "envs" / "schemas" / f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def readme(text: str) -> str:
    table = profiles.support_table(profiles.load(ROOT / "envs"))
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    return pattern.sub(lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", text)


def main(check: bool) -> int:
    wanted = schemas()
    readme_path = ROOT / "README.md"
    wanted[readme_path] = readme(readme_path.read_text())
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run python scripts/gen_docs.py)", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(wanted[p])
        print(f"wrote {p.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv[1:]))
