"""The quick no-op (install/noop.py): a re-run that changes nothing answers from the stamp without importing the
transaction; anything it depends on that moved sends it through the full run, which decides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT

TEST_ENVS = ROOT / "tests" / "envs"


def install(channel, prefix, *args, envs_dir=TEST_ENVS):
    """`lorastrap install --json` under -X importtime: (exit code, result, stderr narration, modules imported)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorastrap", "install", "--envs-dir",
                          str(envs_dir), "--channel", channel["url"], "--pip-index-url", channel["simple"], "--prefix",
                          str(prefix), "--no-verify", "--json", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    modules = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    narration = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("import time:"))
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else None), narration, modules


def test_rerun_is_answered_by_the_stamp_and_anything_moved_runs_in_full(channel, warm_home, tmp_path):
    prefix = tmp_path / "env"
    rc, first, err, _ = install(channel, prefix)
    assert rc == 0 and first["changed"], err
    assert (prefix / "conda-meta" / "lorastrap" / "noop.json").is_file()

    rc, again, err, modules = install(channel, prefix)
    assert rc == 0 and "nothing to do" in err, err
    assert "lorastrap.install.transaction" not in modules and "pydantic" not in modules  # the quick path
    assert not again["changed"] and again["verify_verdict"] == "unchanged" and again["downloaded_bytes"] == 0
    assert {k: v for k, v in again.items() if k not in ("timings", "finished_at")} == \
        {k: v for k, v in first.items() if k not in ("timings", "finished_at")} | {
            "changed": False, "verify_verdict": "unchanged", "downloaded_bytes": 0, "verify": None}

    # The profiles changed (a copy of the folder: its files' stats differ): the full run decides, still a no-op.
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    rc, full, err, modules = install(channel, prefix, envs_dir=envs)
    assert rc == 0 and not full["changed"] and "lorastrap.install.transaction" in modules, err
    rc, _, err, modules = install(channel, prefix, envs_dir=envs)  # and the stamp now holds for that folder
    assert rc == 0 and "lorastrap.install.transaction" not in modules, err

    # A file of a package cut short: the stamp does not hold, the full run sees the damage and rebuilds.
    victim = next(p for p in (prefix / "lib").rglob("*.py") if p.stat().st_size > 10)
    with open(victim, "r+b") as f:
        f.truncate(5)
    rc, rebuilt, err, modules = install(channel, prefix, envs_dir=envs)
    assert rc == 0 and rebuilt["changed"] and rebuilt["repaired"], err
    assert "lorastrap.install.transaction" in modules
    assert victim.stat().st_size > 10

    # Another flag (the engine asked for): the full run.
    rc, _, err, modules = install(channel, prefix, "--engine", "rattler", envs_dir=envs)
    assert rc == 0 and "lorastrap.install.transaction" in modules, err


def test_a_stamp_for_other_inputs_is_not_used(channel, warm_home, tmp_path):
    """A stamp copied from another environment (another prefix in its key) is ignored."""
    a, b = tmp_path / "a", tmp_path / "b"
    for prefix in (a, b):
        rc, _, err, _ = install(channel, prefix)
        assert rc == 0, err
    stamp = a / "conda-meta" / "lorastrap" / "noop.json"
    shutil.copy(stamp, b / "conda-meta" / "lorastrap" / "noop.json")
    os.utime(b / "conda-meta" / "lorastrap" / "noop.json")
    rc, out, err, modules = install(channel, b)
    assert rc == 0 and not out["changed"] and out["prefix"] == str(b)
    assert "lorastrap.install.transaction" in modules
