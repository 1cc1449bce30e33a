"""Trust: lorastrap replaces or deletes only what it made (its record in conda-meta/lorastrap/) or what the user
names with --force; without a terminal a destructive command needs --yes; packages stay inside their prefix; the
children it records are its own."""

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

TEST_ENVS = ROOT / "tests" / "envs"


def install(channel, prefix, *args, env=None):
    return run_cli("install", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                   channel["simple"], "--prefix", str(prefix), "--no-verify", *args, env=env)


def foreign_env(path: Path) -> Path:
    """A conda environment another tool made (a Miniforge base: envs/ and pkgs/ of its own, no lorastrap record)."""
    (path / "conda-meta").mkdir(parents=True)
    (path / "conda-meta" / "history").write_text("==> 2025-01-01 <==\n# cmd: conda create\n")
    (path / "envs" / "work" / "conda-meta").mkdir(parents=True)
    (path / "envs" / "work" / "notes.txt").write_text("mine")
    (path / "pkgs").mkdir()
    (path / "pkgs" / "urls.txt").write_text("")
    return path


def ours(path: Path) -> Path:
    """A folder carrying lorastrap's record (what uninstall removes)."""
    (path / "conda-meta" / "lorastrap").mkdir(parents=True)
    (path / "conda-meta" / "lorastrap" / "record.json").write_text("{}")
    return path


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def register(home: Path, *prefixes: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "environments.json").write_text(json.dumps({"environments": [str(p) for p in prefixes]}))


def test_install_never_replaces_another_tools_environment_unless_forced(channel, warm_home, tmp_path):
    prefix = foreign_env(tmp_path / "base")
    before = tree(prefix)
    res = install(channel, prefix)
    assert res.returncode == 17, res.stderr
    assert "did not make" in res.stderr and "--force" in res.stderr and "Traceback" not in res.stderr
    assert tree(prefix) == before and not Path(f"{prefix}.lorastrap-backup").exists()
    res = install(channel, prefix, "--force")
    assert res.returncode == 0, res.stderr
    assert (prefix / "conda-meta" / "lorastrap" / "record.json").is_file()
    assert tree(Path(f"{prefix}.lorastrap-backup")) == before  # kept whole, never deleted
    assert not (prefix / "envs").exists() and not (prefix / "pkgs").exists()  # not "carried over" file by file


def test_uninstall_drops_a_registry_entry_whose_folder_is_the_users_now(home, tmp_path):
    prefix = tmp_path / "env"  # lorastrap's once; removed by hand; now the user's folder
    prefix.mkdir()
    (prefix / "thesis.tex").write_text("precious")
    register(home, prefix)
    for args in (["--yes"], []):
        res = run_cli("uninstall", "--prefix", str(prefix), "--json", *args)
        if args:
            assert res.returncode == 0, res.stderr
            doc = json.loads(res.stdout)
            assert doc["dropped_from_registry"] and not doc["removed"]
        else:  # the entry is gone: now it is simply not lorastrap's
            assert res.returncode == 17, res.stderr
        assert (prefix / "thesis.tex").read_text() == "precious"
    assert json.loads((home / "environments.json").read_text())["environments"] == []


def test_uninstall_and_repair_need_yes_without_a_terminal(home, tmp_path):
    prefix = ours(tmp_path / "env")
    register(home, prefix)
    res = run_cli("uninstall", "--prefix", str(prefix))
    assert res.returncode == 2 and "needs --yes" in res.stderr and prefix.exists(), res.stderr
    res = run_cli("repair", "--prefix", str(prefix), "--envs-dir", str(TEST_ENVS), "--channel", "http://127.0.0.1:9/x")
    assert res.returncode == 2 and "needs --yes" in res.stderr and prefix.exists(), res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("uninstall", "--prefix", str(prefix), "--yes")
    assert res.returncode == 0 and not prefix.exists(), res.stderr


def test_self_uninstall_keeps_a_foreign_environment_in_the_data_dir(home, tmp_path):
    mine = ours(home / "envs" / "lora")
    theirs = foreign_env(home / "envs" / "made-by-conda")
    before = tree(theirs)
    outside = tmp_path / "old"  # registered, no longer lorastrap's
    outside.mkdir()
    (outside / "data.csv").write_text("1,2")
    register(home, mine, outside)
    res = run_cli("self", "uninstall", "--yes")
    assert res.returncode == 0, res.stderr
    assert not mine.exists() and tree(theirs) == before and (outside / "data.csv").read_text() == "1,2"
    assert not (home / "pkgs").exists() and not (home / "environments.json").exists()
