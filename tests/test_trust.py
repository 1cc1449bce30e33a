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


# --------------------------------------------------------------------------------------------------------------
# Containment: hostile packages (real .conda archives) added to the test profile's lock

def add_to_lock(home: Path, archives: list[Path], profile: str = "test-cpu") -> None:
    """Append ARCHIVES (file:// URLs, their real hashes) to the lock lorastrap locked here for PROFILE."""
    import hashlib
    import yaml
    lock = home / "locks" / f"{profile}.linux-64.conda-lock.yml"
    doc = yaml.safe_load(lock.read_text())
    for a in archives:
        data = a.read_bytes()
        name = a.name.split("-1.0-")[0]
        doc["package"].append({"name": name, "version": "1.0", "manager": "conda", "platform": "linux-64",
                               "dependencies": {}, "url": a.as_uri(), "build": "h0_0", "category": "main",
                               "optional": False, "hash": {"md5": hashlib.md5(data).hexdigest(),
                                                           "sha256": hashlib.sha256(data).hexdigest()}})
    lock.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture
def outside(tmp_path):
    """A folder outside every prefix that hostile packages try to reach; it must stay empty."""
    d = tmp_path / "outside"
    d.mkdir()
    return d


def hostile(tmp_path, outside, *kinds):
    import testchannel
    return [testchannel.hostile(tmp_path / "hostile", kind, outside) for kind in kinds]


@pytest.mark.parametrize("kinds", [("paths-traversal",), ("tar-traversal",), ("symlink-out",),
                                   ("link-maker", "link-user"), ("fifo",)])
def test_a_package_that_writes_outside_the_prefix_is_refused_before_linking(channel, warm_home, tmp_path, outside,
                                                                            engine, kinds):
    add_to_lock(warm_home, hostile(tmp_path, outside, *kinds))
    prefix = tmp_path / "env"
    res = install(channel, prefix)
    assert res.returncode == 18, res.stderr
    assert "outside" in res.stderr or "link" in res.stderr or "FIFO" in res.stderr
    assert "Nothing was installed" in res.stderr and "Traceback" not in res.stderr
    assert list(outside.iterdir()) == [] and not prefix.exists()
    # Nowhere else — but in the package cache's unpacked copy of the package that holds it: each package passed its
    # own containment check and was unpacked ahead, into a folder of its own, while the others downloaded (the
    # two-package case is refused when they are checked together, before any link).  Never through a link.
    extracted = warm_home / "pkgs" / "extracted"
    for found in tmp_path.rglob("pwned.txt"):
        assert found.is_relative_to(extracted / "hostile-link-user-1.0-h0_0"), found
        assert not any(p.is_symlink() for p in [found, *found.parents] if p.is_relative_to(extracted)), found


def test_a_link_inside_the_package_is_fine(channel, warm_home, tmp_path, outside):
    # the embedded engine only: micromamba 1.5 rejects this hand-made archive's extracted copy for other reasons
    add_to_lock(warm_home, hostile(tmp_path, outside, "inner-link"))
    prefix = tmp_path / "env"
    res = install(channel, prefix, "--engine", "rattler")
    assert res.returncode == 0, res.stderr
    assert (prefix / "lib64").is_symlink() and (prefix / "lib64" / "ok.txt").read_text() == "ok\n"


def test_a_path_through_a_link_is_judged_by_where_it_lands():
    from lorastrap.install.archive import _through_link
    links = {"lib64": "lib", "share/out": "/etc", "share/up": "../../..", "a": "b", "b": "a"}
    assert _through_link("lib64/ok.txt", links) is None and _through_link("lib64", links) is None
    assert _through_link("share/out/passwd", links) == "share/out"
    assert _through_link("share/up/x", links) == "share/up"
    assert _through_link("a/x", links) is not None  # a loop



def test_link_scripts_one_policy_for_both_engines(channel, warm_home, tmp_path, outside, engine):
    add_to_lock(warm_home, hostile(tmp_path, outside, "script"))
    prefix = tmp_path / "env"
    res = install(channel, prefix)
    assert res.returncode == 18 and "link scripts" in res.stderr and "--allow-link-scripts" in res.stderr, res.stderr
    assert not prefix.exists() and list(outside.iterdir()) == []
    res = install(channel, prefix, "--allow-link-scripts")
    assert res.returncode == 0, res.stderr
    if engine == "rattler":  # the embedded engine never runs them, and says so
        assert "not run" in res.stderr and list(outside.iterdir()) == []
    else:  # micromamba has no switch to skip them: it runs them, and lorastrap says so first
        assert "micromamba runs them" in res.stderr


def test_an_oversized_file_is_sized_by_what_it_unpacks_to(channel, warm_home, tmp_path, outside):
    import shutil as sh
    add_to_lock(warm_home, hostile(tmp_path, outside, "oversized"))
    prefix = tmp_path / "env"
    free_mib = sh.disk_usage(tmp_path).free // 2**20
    res = install(channel, prefix, "--min-free-mib", str(free_mib - 256))  # room for the archives, not 512 MiB
    assert res.returncode == 7 and "not enough free disk" in res.stderr, res.stderr
    assert not prefix.exists()


def test_carry_over_never_writes_through_a_packages_link_and_keeps_links_folders_fifos(
        channel, warm_home, tmp_path, outside):
    prefix = tmp_path / "env"
    assert install(channel, prefix, "--engine", "rattler").returncode == 0
    (prefix / "share" / "outlink").mkdir()  # the user's folder here; the next lock's package makes it a link out
    (prefix / "share" / "outlink" / "notes.txt").write_text("mine")
    (prefix / "work" / "empty").mkdir(parents=True)
    (prefix / "work" / "data.txt").write_text("data")
    os.symlink("data.txt", prefix / "work" / "link-to-file")
    os.symlink("/nonexistent/elsewhere", prefix / "work" / "dangling")
    os.symlink("empty", prefix / "work" / "link-to-folder")
    os.mkfifo(prefix / "work" / "pipe")
    add_to_lock(warm_home, hostile(tmp_path, outside, "link-maker"))
    res = install(channel, prefix, "--engine", "rattler", "--keep-backup")
    assert res.returncode == 0, res.stderr
    assert list(outside.iterdir()) == []  # nothing written through the package's link
    assert (prefix / "share" / "outlink").is_symlink()
    assert "not carried over (1" in res.stderr and "share/outlink/notes.txt" in res.stderr
    assert (Path(f"{prefix}.lorastrap-backup") / "share" / "outlink" / "notes.txt").read_text() == "mine"
    work = prefix / "work"
    assert (work / "data.txt").read_text() == "data" and (work / "empty").is_dir()
    assert os.readlink(work / "link-to-file") == "data.txt" and os.readlink(work / "dangling") == "/nonexistent/elsewhere"
    assert os.readlink(work / "link-to-folder") == "empty"
    import stat
    assert stat.S_ISFIFO(os.lstat(work / "pipe").st_mode)
