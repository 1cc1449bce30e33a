"""lock: real solves with py-rattler over the test channel; files conda-lock itself reads and renders."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from lorastrap.core import errors
from lorastrap.locking import lockfile
from lorastrap.matrix import profiles

TEST_ENVS = ROOT / "tests" / "envs"
VENV_BIN = Path(sys.executable).parent


def do_lock(channel, out, *args):
    res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
                  channel["simple"], "-o", str(out), *args)
    assert res.returncode == 0, res.stderr
    return lockfile.read_lock(out)


def builds(lk, platform, name):
    return [e.build for e in lk.for_platform(platform) if e.name == name]


def test_lock_both_platforms_with_and_without_cuda(channel, home, tmp_path):
    cuda = do_lock(channel, tmp_path / "cuda.conda-lock.yml", "--profile", "test-cuda")
    cpu = do_lock(channel, tmp_path / "cpu.conda-lock.yml", "--profile", "test-cpu")
    for platform in ("linux-64", "linux-aarch64"):  # aarch64 solved from this x86_64 machine
        assert builds(cuda, platform, "pytorch")[0].startswith("cuda")
        assert builds(cuda, platform, "bitsandbytes")[0].startswith("cuda")
        assert builds(cpu, platform, "pytorch")[0].startswith("cpu")
        assert not any(e.name in ("libcublas", "cuda-cudart", "cuda-version") for e in cpu.for_platform(platform))
        assert [e.platform for e in cuda.entries if e.name == "python"] .count(platform) == 1
        urls = [e.url for e in cpu.for_platform(platform) if e.name == "pytorch"]
        assert f"/{platform}/" in urls[0]
    pip = [e for e in cpu.entries if e.manager == "pip"]
    assert {e.platform for e in pip} == {"linux-64", "linux-aarch64"}
    assert all(e.name == "lorastrap-testwheel" and e.url.startswith(channel["simple"]) and len(e.sha256) == 64
               for e in pip)
    assert cpu.custom["lorastrap_profile"] == "test-cpu"
    assert set(cpu.content_hash) == {"linux-64", "linux-aarch64"}


def test_conda_lock_parses_and_renders_our_lock(channel, home, tmp_path):
    out = tmp_path / "test-cpu.conda-lock.yml"
    do_lock(channel, out, "--profile", "test-cpu")
    from conda_lock.lockfile import parse_conda_lock_file  # conda-lock's own parser, in this process
    parsed = parse_conda_lock_file(out)
    assert "linux-64" in parsed.metadata.platforms and len(parsed.package) == len(lockfile.read_lock(out).entries)
    render = subprocess.run([str(VENV_BIN / "conda-lock"), "render", "--kind", "explicit", "-p", "linux-64",
                             str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert render.returncode == 0, render.stderr
    explicit = (tmp_path / "conda-linux-64.lock").read_text()
    assert "@EXPLICIT" in explicit and "pytorch-2.10.0-cpu" in explicit


def test_a_changed_spec_makes_the_lock_stale(channel, home, tmp_path):
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    out = envs / "test-cpu.conda-lock.yml"
    res = run_cli("lock", "--envs-dir", str(envs), "--profile", "test-cpu", "--platform", "linux-64",
                  "--channel", channel["url"], "--pip-index-url", channel["simple"])
    assert res.returncode == 0, res.stderr
    matrix = profiles.load(envs)
    lk = lockfile.read_lock(out)
    assert not lockfile.is_stale(lk, envs, matrix.profiles["test-cpu"])
    before = lk.content_hash["linux-64"]
    (envs / "test-cpu.yml").write_text((envs / "test-cpu.yml").read_text().replace("  - peft\n", "  - peft >=0.20\n"))
    assert lockfile.is_stale(lk, envs, matrix.profiles["test-cpu"])
    # conda-lock's own content hash changes too (what `conda-lock --check-input-hash` compares).
    res = run_cli("lock", "--envs-dir", str(envs), "--profile", "test-cpu", "--platform", "linux-64",
                  "--channel", channel["url"], "--pip-index-url", channel["simple"])
    assert res.returncode == 0
    assert lockfile.read_lock(out).content_hash["linux-64"] != before


def test_unreachable_channel_is_a_clear_network_error(home, tmp_path):
    res = run_cli("lock", "--envs-dir", str(TEST_ENVS), "--profile", "test-cpu", "--platform", "linux-64",
                  "--channel", "http://127.0.0.1:9/nothing", "-o", str(tmp_path / "x.conda-lock.yml"))
    assert res.returncode == 5, res.stderr
    assert "could not read the channel" in res.stderr and "--mirror" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("case,edit,expect", [
    ("bad-yaml", lambda t: "version: 1\npackage: [\n", "not valid YAML"),
    ("missing-hash", lambda t: t.replace("    sha256: ", "    sha999: ", 1), ".hash.sha256': missing"),
    ("unknown-manager", lambda t: t.replace("manager: conda", "manager: cargo", 1), "unknown manager 'cargo'"),
    ("no-version", lambda t: t.replace("version: 1\n", "", 1), "field 'version'"),
])
def test_malformed_lock_names_file_and_field(channel, home, tmp_path, case, edit, expect):
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    lk = envs / "test-cpu.conda-lock.yml"
    do_lock(channel, lk, "--profile", "test-cpu", "--platform", "linux-64")
    lk.write_text(edit(lk.read_text()))
    res = run_cli("install", "--envs-dir", str(envs), "--frozen", "--prefix", str(tmp_path / "env"))
    assert res.returncode == 4, res.stderr
    assert str(lk) in res.stderr and expect in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "env").exists()


def test_platform_missing_from_a_frozen_lock(channel, home, tmp_path):
    envs = tmp_path / "envs"
    shutil.copytree(TEST_ENVS, envs)
    do_lock(channel, envs / "test-cpu.conda-lock.yml", "--profile", "test-cpu", "--platform", "linux-aarch64")
    res = run_cli("install", "--envs-dir", str(envs), "--frozen", "--prefix", str(tmp_path / "env"))
    assert res.returncode == errors.NO_LOCK, res.stderr
    assert "has no linux-64 section" in res.stderr and "--frozen" in res.stderr


def test_cpu_lock_never_uses_conda_lock_default_cuda(channel, home, tmp_path):
    # conda-lock's defaults would add __cuda 11.4 for linux-64; the profile's virtual packages have none.
    vp = yaml.safe_load((TEST_ENVS / "test-cpu.virtual-packages.yml").read_text())
    assert "__cuda" not in json.dumps(vp)
    lk = do_lock(channel, tmp_path / "cpu.conda-lock.yml", "--profile", "test-cpu", "--platform", "linux-64")
    assert all(not (e.build or "").startswith("cuda") for e in lk.entries)


CONDA_SPEC_LINES = ["python", "python 3.12.*", "pytorch >=2.8 cpu*", "transformers >=5.0,<6", "accelerate 0.17.1",
                    "tokenizers >=0.11.1,!=0.11.3,<0.14", "cuda-version 12.9.*", "bitsandbytes 0.45.* cuda118*",
                    "huggingface_hub >=0.11.0,<1.0", "numpy <2", "libcublas 12.*", "setuptools <81"]


def _conda_lock_written(tmp_path, spec, vps, channels, platforms, packages, custom):
    """The lock conda-lock's own models, writer and content hash give for these packages."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.lockfile import write_conda_lock_file
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency, Lockfile, LockMeta
    from conda_lock.models.channel import Channel
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification
    out = tmp_path / "theirs" / "x.conda-lock.yml"
    out.parent.mkdir()
    lock_spec = make_lock_spec(src_files=[spec], channel_overrides=channels, platform_overrides=platforms,
                               mapping_url=str(ROOT / "envs" / "pypi-to-conda.json"))
    hashes = compute_content_hashes(lock_spec, virtual_package_repo_from_specification(vps))
    deps = [LockedDependency(name=p["name"], version=p["version"], manager=p["manager"], platform=p["platform"],
                             dependencies=p.get("dependencies", {}), url=p["url"],
                             hash=HashModel(md5=p.get("md5"), sha256=p["sha256"]), categories={"main"},
                             build=p.get("build")) for p in packages]
    meta = LockMeta(content_hash=hashes, channels=[Channel.from_string(u) for u in channels], platforms=platforms,
                    sources=[f"../{spec.name}"], custom_metadata=custom)
    write_conda_lock_file(Lockfile(package=deps, metadata=meta), out, metadata_choices=set())
    return hashes, out.read_text()


@pytest.mark.parametrize("spec_name", sorted(p.name for p in (ROOT / "envs").glob("*.yml")
                                             if p.with_suffix("").suffix != ".virtual-packages"
                                             and (p.parent / p.name.replace(".yml", ".virtual-packages.yml")).exists())
                         + ["synthetic"])
def test_our_writer_and_content_hash_are_conda_locks(tmp_path, spec_name):
    """lockfile.write (no conda-lock import) gives conda-lock's own bytes and content hash, on every real spec and
    on every conda line shape the profiles use."""
    from lorastrap.locking import condalock
    if spec_name == "synthetic":
        spec = tmp_path / "synthetic.yml"
        spec.write_text("channels:\n  - conda-forge\ndependencies:\n" + "".join(f"  - {s}\n" for s in CONDA_SPEC_LINES)
                        + "  - pip:\n      - bitsandbytes==0.50.2\n      - peft>=0.19\n")
        vps = ROOT / "envs" / "cpu.virtual-packages.yml"
    else:
        spec = ROOT / "envs" / spec_name
        vps = ROOT / "envs" / spec_name.replace(".yml", ".virtual-packages.yml")
    platforms = sorted(yaml.safe_load(vps.read_text())["subdirs"])
    channels = ["https://conda.anaconda.org/conda-forge", "file:///srv/mirror/channel"]
    packages = [{"name": n, "version": "1.0", "manager": "conda", "platform": p, "url": f"{channels[0]}/{p}/{n}.conda",
                 "md5": "0" * 32, "sha256": f"{i:064x}", "build": "h0_0",
                 "dependencies": {"zlib": ">=1.2", "libgcc": "*"} if n != "zlib" else {}}
                for p in platforms for i, n in enumerate(("zlib", "python", "a-long-named-package_with_under", "_openmp_mutex"))]
    packages += [{"name": "bitsandbytes", "version": "0.50.2", "manager": "pip", "platform": p,
                  "url": "https://files.pythonhosted.org/packages/b/bitsandbytes-0.50.2-py3-none-any.whl",
                  "sha256": "f" * 64} for p in platforms]
    custom = {"lorastrap_profile": "x", "lorastrap_inputs_sha256": "a" * 64}
    hashes, theirs = _conda_lock_written(tmp_path, spec, vps, channels, platforms, packages, custom)
    assert condalock.content_hashes(spec, vps, channels, platforms) == hashes
    out = tmp_path / "ours" / "x.conda-lock.yml"
    out.parent.mkdir()
    spec_copy = tmp_path / spec.name
    if spec_copy != spec:
        shutil.copy(spec, spec_copy)  # sources: ../NAME, as conda-lock's copy says
    lockfile.write(out, spec=spec_copy, virtual_packages=vps, channels=channels, platforms=platforms,
                   packages=packages, custom_metadata=custom)
    assert out.read_text() == theirs
    # Re-locking one platform keeps the others' entries and gives the same bytes again.
    lockfile.write(out, spec=spec_copy, virtual_packages=vps, channels=channels, platforms=platforms[:1],
                   packages=[p for p in packages if p["platform"] == platforms[0]], custom_metadata=custom)
    assert out.read_text() == theirs


def test_a_spec_outside_the_fast_grammar_gets_conda_locks_own_hash(tmp_path):
    from lorastrap.locking import condalock
    spec = tmp_path / "odd.yml"
    spec.write_text("channels: [conda-forge]\ndependencies:\n  - conda-forge::python =3.12\n  - numpy  # [linux]\n")
    vps = ROOT / "envs" / "cpu.virtual-packages.yml"
    assert condalock.content_hashes(spec, vps, ["https://conda.anaconda.org/conda-forge"], ["linux-64"]) is None
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification
    channels = ["https://conda.anaconda.org/conda-forge"]
    want = compute_content_hashes(make_lock_spec(src_files=[spec], channel_overrides=channels,
                                                 platform_overrides=["linux-64"],
                                                 mapping_url=str(ROOT / "envs" / "pypi-to-conda.json")),
                                  virtual_package_repo_from_specification(vps))
    assert lockfile._conda_lock_hashes(spec, vps, channels, ["linux-64"]) == want


def test_a_parsed_lock_is_reused_only_for_the_same_bytes_and_a_bad_cache_entry_is_ignored(tmp_path, monkeypatch):
    """read_lock keeps the parsed YAML (as JSON, one entry per lock file, in the user's data dir — not the package
    cache, which others may share) and uses it only while the file's bytes are the ones parsed: a lock edited in
    place is read afresh, a corrupt entry is ignored and rewritten."""
    import json
    import yaml
    from lorastrap.locking import lockfile
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORASTRAP_PKGS_DIR", str(tmp_path / "shared-pkgs"))
    doc = {"version": 1, "metadata": {"platforms": ["linux-64"], "channels": [{"url": "https://c", "used_env_vars": []}],
                                      "content_hash": {"linux-64": "x"}},
           "package": [{"name": "a", "version": "1.10", "manager": "conda", "platform": "linux-64",
                        "url": "https://c/linux-64/a-1.10-0.conda", "hash": {"sha256": "1" * 64},
                        "dependencies": {"b": ">=1"}}]}
    lock = tmp_path / "x.conda-lock.yml"
    lock.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert lockfile.read_lock(lock) and not (tmp_path / "home").exists()  # a plain read keeps nothing
    first = lockfile.read_lock(lock, keep=True)
    kept = list((tmp_path / "home" / "checked").glob("lock.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["raw"] == first.raw
    assert lockfile.read_lock(lock).entries == first.entries  # from what was kept: the same
    doc["package"][0]["version"] = "1.11"  # edited in place: same path, other bytes
    lock.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert lockfile.read_lock(lock, keep=True).entries[0].version == "1.11"
    kept[0].write_text("{not json")
    assert lockfile.read_lock(lock, keep=True).entries[0].version == "1.11"
    assert json.loads(kept[0].read_text())["raw"]["package"][0]["version"] == "1.11"  # rewritten
    assert not (tmp_path / "shared-pkgs").exists()
