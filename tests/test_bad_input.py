"""Every bad input is refused with what / why / fix, a documented exit code >= 2, JSON under --json, no traceback,
and nothing left beside a refused path.  Runs lorastrap's real `main` in-process (each case fails before any
engine would start), with the real filesystem, environment variables and test channel."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT

from lorastrap import cli
from lorastrap.core import errors

ENVS = str(ROOT / "tests" / "envs")


def _setup(tmp: Path) -> dict[str, str]:
    """The files the cases point at."""
    (tmp / "afile").write_text("x")
    (tmp / "notenv").mkdir()
    (tmp / "notenv" / "keep.txt").write_text("mine")
    (tmp / "noexec").write_text("#!/bin/sh\n")
    os.chmod(tmp / "noexec", 0o644)
    (tmp / "notjson").write_text("{not json")
    (tmp / "badyaml").mkdir()
    (tmp / "badyaml" / "profiles.yaml").write_text("profiles: [unclosed\n")
    bundle = tmp / "bundle-bad"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"schema_version": 1, "profile": 3}')
    nomanifest = tmp / "nomanifest.tar"
    with tarfile.open(nomanifest, "w") as t:
        data = b"hello"
        info = tarfile.TarInfo("b/readme.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    full = tmp / "good.tar"
    with tarfile.open(full, "w") as t:
        data = b'{"schema_version": 1}' * 2000
        info = tarfile.TarInfo("c/manifest.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    (tmp / "truncated.tar").write_bytes(full.read_bytes()[:3000])
    (tmp / "loop1").symlink_to(tmp / "loop2")
    (tmp / "loop2").symlink_to(tmp / "loop1")
    os.mkfifo(tmp / "fifo")
    env = tmp / "env"  # a conda environment whose package file became a directory, and one a symlink
    (env / "conda-meta").mkdir(parents=True)
    (env / "lib").mkdir()
    (env / "lib" / "thing.so").mkdir()
    (env / "lib" / "other.so").symlink_to("/etc/hostname")
    (env / "conda-meta" / "thing-1.0-0.json").write_text(json.dumps({
        "name": "thing", "version": "1.0", "build": "0", "sha256": "0" * 64,
        "paths_data": {"paths_version": 1, "paths": [
            {"_path": "lib/thing.so", "path_type": "hardlink", "sha256": "1" * 64},
            {"_path": "lib/other.so", "path_type": "hardlink", "sha256": "2" * 64}]}}))
    return {"T": str(tmp)}


I = ["install", "--envs-dir", ENVS, "--no-verify"]

# id, argv ({T} is the test's folder), extra environment, expected exit code
CASES = [
    ("override-cuda-abc", ["plan", "--envs-dir", ENVS], {"CONDA_OVERRIDE_CUDA": "abc"}, errors.USAGE),
    ("override-cuda-12.x", ["detect"], {"CONDA_OVERRIDE_CUDA": "12.x"}, errors.USAGE),
    ("override-cuda-negative", ["plan", "--envs-dir", ENVS], {"CONDA_OVERRIDE_CUDA": "-1"}, errors.USAGE),
    ("override-cuda-spaces", ["detect"], {"CONDA_OVERRIDE_CUDA": "1 2"}, errors.USAGE),
    ("override-glibc-garbage", ["detect"], {"CONDA_OVERRIDE_GLIBC": "garbage"}, errors.USAGE),
    ("override-cuda-arch-foo", ["plan", "--envs-dir", ENVS], {"CONDA_OVERRIDE_CUDA_ARCH": "foo"}, errors.USAGE),
    ("override-in-install", I + ["--prefix", "{T}/p1"], {"CONDA_OVERRIDE_CUDA": "12.x"}, errors.USAGE),
    ("prefix-root", I + ["--prefix", "/"], {}, errors.USAGE),
    ("prefix-is-a-file", I + ["--prefix", "{T}/afile"], {}, errors.USAGE),
    ("prefix-parent-is-a-file", I + ["--prefix", "{T}/afile/env"], {}, errors.USAGE),
    ("prefix-not-an-env", I + ["--prefix", "{T}/notenv"], {}, errors.USAGE),
    ("prefix-empty", I + ["--prefix", ""], {}, errors.USAGE),
    ("prefix-is-the-data-dir", I + ["--prefix", "{T}/home"], {}, errors.USAGE),
    ("prefix-read-only-fs", I + ["--prefix", "/sys/lorastrap-env"], {}, errors.NOT_WRITABLE),
    ("home-relative", I + ["--name", "x"], {"LORASTRAP_HOME": "rel/home"}, errors.USAGE),
    ("home-is-a-file", I + ["--name", "x"], {"LORASTRAP_HOME": "{T}/afile"}, errors.USAGE),
    ("pkgs-dir-is-a-file", I + ["--prefix", "{T}/p2"], {"LORASTRAP_PKGS_DIR": "{T}/afile"}, errors.USAGE),
    ("pkgs-dir-relative", I + ["--prefix", "{T}/p3"], {"LORASTRAP_PKGS_DIR": "pkgs"}, errors.USAGE),
    ("HOME-empty", I, {"LORASTRAP_HOME": None, "XDG_DATA_HOME": None, "HOME": ""}, errors.USAGE),
    ("xdg-relative", I, {"LORASTRAP_HOME": None, "XDG_DATA_HOME": "data"}, errors.USAGE),
    ("xdg-no-such-user", I, {"LORASTRAP_HOME": None, "XDG_DATA_HOME": "~no-such-user-here/data"}, errors.USAGE),
    ("home-no-such-user", I + ["--engine", "rattler"], {"LORASTRAP_HOME": "~no-such-user-here/ls"}, errors.USAGE),
    ("report-missing-folder", I + ["--prefix", "{T}/p4", "--report", "{T}/missing/r.json"], {}, errors.USAGE),
    ("report-is-a-folder", I + ["--prefix", "{T}/p5", "--report", "{T}/notenv"], {}, errors.USAGE),
    ("verify-report-missing-folder", ["verify", "--prefix", "{T}/env", "--report", "{T}/missing/r.json"], {},
     errors.USAGE),
    ("bundle-bad-manifest", I + ["--prefix", "{T}/p6", "--bundle", "{T}/bundle-bad"], {}, errors.CONFIG),
    ("bundle-tar-no-manifest", I + ["--prefix", "{T}/p7", "--bundle", "{T}/nomanifest.tar"], {}, errors.CONFIG),
    ("bundle-tar-truncated", I + ["--prefix", "{T}/p8", "--bundle", "{T}/truncated.tar"], {}, errors.CONFIG),
    ("bundle-missing", I + ["--prefix", "{T}/p9", "--bundle", "{T}/nowhere"], {}, errors.CONFIG),
    ("mamba-exe-not-executable", I + ["--prefix", "{T}/p10", "--engine", "micromamba"],
     {"MAMBA_EXE": "{T}/noexec"}, errors.USAGE),
    ("mamba-exe-a-folder", I + ["--prefix", "{T}/p11"], {"MAMBA_EXE": "{T}/notenv"}, errors.USAGE),
    ("mamba-exe-missing", I + ["--prefix", "{T}/p12"], {"MAMBA_EXE": "{T}/nothing"}, errors.USAGE),
    ("min-free-negative", I + ["--prefix", "{T}/p13", "--min-free-mib", "-100000"], {}, errors.USAGE),
    ("min-free-not-a-number", I + ["--prefix", "{T}/p14", "--min-free-mib", "lots"], {}, errors.USAGE),
    ("name-escapes", I + ["--name", "../../x"], {}, errors.USAGE),
    ("name-with-slash", I + ["--name", "a/b"], {}, errors.USAGE),
    ("name-empty", I + ["--name", ""], {}, errors.USAGE),
    ("name-dot", I + ["--name", "."], {}, errors.USAGE),
    ("channel-empty", I + ["--prefix", "{T}/p15", "--channel", ""], {}, errors.USAGE),
    ("channel-garbage", I + ["--prefix", "{T}/p16", "--channel", "ht!tp://x y"], {}, errors.USAGE),
    ("channel-ftp", I + ["--prefix", "{T}/p17", "--channel", "ftp://example.org/x"], {}, errors.USAGE),
    ("channel-missing-path", I + ["--prefix", "{T}/p18", "--channel", "{T}/nochannel"], {}, errors.USAGE),
    ("mirror-empty", I + ["--prefix", "{T}/p19", "--mirror", ""], {}, errors.USAGE),
    ("pip-index-not-a-url", I + ["--prefix", "{T}/p20", "--pip-index-url", "not a url"], {}, errors.USAGE),
    ("machine-dev-zero", ["doctor", "--prefix", "{T}/env", "--machine", "/dev/zero"], {}, errors.CONFIG),
    ("machine-missing", ["doctor", "--prefix", "{T}/env", "--machine", "{T}/nothing"], {}, errors.CONFIG),
    ("machine-not-json", ["doctor", "--prefix", "{T}/env", "--machine", "{T}/notjson"], {}, errors.CONFIG),
    ("doctor-prefix-a-file", ["doctor", "--prefix", "{T}/afile"], {}, errors.USAGE),
    ("doctor-not-an-env", ["doctor", "--prefix", "{T}/notenv", "--no-imports"], {}, errors.USAGE),
    ("doctor-file-became-dir-and-link", ["doctor", "--prefix", "{T}/env", "--no-imports", "--envs-dir", ENVS], {},
     errors.DOCTOR_REPAIRABLE),
    ("repair-not-an-env", ["repair", "--prefix", "{T}/notenv", "--yes", "--envs-dir", ENVS], {}, errors.USAGE),
    ("verify-not-an-env", ["verify", "--prefix", "{T}/notenv"], {}, errors.USAGE),
    ("verify-steps-negative", ["verify", "--prefix", "{T}/env", "--steps", "-1"], {}, errors.USAGE),
    ("envs-dir-missing", ["plan", "--envs-dir", "{T}/nothing"], {}, errors.CONFIG),
    ("envs-dir-bad-yaml", ["plan", "--envs-dir", "{T}/badyaml"], {}, errors.CONFIG),
    ("profile-unknown", I + ["--prefix", "{T}/p21", "--profile", "nope"], {}, errors.USAGE),
    ("why-not-unknown", ["plan", "--envs-dir", ENVS, "--why-not", "nope"], {}, errors.USAGE),
    ("lock-platform-unknown", ["lock", "--envs-dir", ENVS, "--profile", "test-cpu", "--platform", "win-99",
                               "-o", "{T}/x-lock.yml"], {}, errors.CONFIG),
    ("unknown-flag", ["install", "--frobnicate"], {}, errors.USAGE),
    ("unknown-command", ["frobnicate"], {}, errors.USAGE),
    ("engine-unknown", I + ["--engine", "conda"], {}, errors.USAGE),
    ("prefix-name-too-long", I + ["--prefix", "{T}/" + "long" * 100], {}, errors.USAGE),
    ("uninstall-root", ["uninstall", "--prefix", "/", "--yes"], {}, errors.USAGE),
    ("doctor-root", ["doctor", "--prefix", "/"], {}, errors.USAGE),
    ("repair-root", ["repair", "--prefix", "/", "--yes", "--envs-dir", ENVS], {}, errors.USAGE),
    ("prefix-symlink-loop", I + ["--prefix", "{T}/loop1"], {}, errors.USAGE),
    ("prefix-newline", I + ["--prefix", "{T}/new\nline"], {}, errors.USAGE),
    ("home-under-a-file", I + ["--prefix", "{T}/p22"], {"LORASTRAP_HOME": "{T}/afile/home"}, errors.USAGE),
    ("cuda-override-fullwidth", ["plan", "--envs-dir", ENVS], {"CONDA_OVERRIDE_CUDA": "１２.４"}, errors.USAGE),
    ("explain-facts-dev-zero", ["explain", "--facts", "/dev/zero", "CUDA error"], {}, errors.USAGE),
    ("explain-facts-fifo", ["explain", "--facts", "{T}/fifo", "CUDA error"], {}, errors.USAGE),
    ("diff-locks-dev-zero", ["diff-locks", "/dev/zero", "/dev/zero"], {}, errors.USAGE),
    ("diff-locks-fifo", ["diff-locks", "{T}/fifo", "{T}/fifo"], {}, errors.USAGE),
    ("bundle-onto-dev-null", ["bundle", "--envs-dir", ENVS, "-o", "/dev/null"], {}, errors.USAGE),
    ("bundle-onto-a-file", ["bundle", "--envs-dir", ENVS, "-o", "{T}/afile"], {}, errors.USAGE),
    ("prefix-longer-than-placeholder", I + ["--prefix", "{T}/" + "/".join(["long" * 15] * 4)], {}, errors.USAGE),
]


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case,argv,env,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, env, code, json_flag, warm_home, channel, tmp_path, monkeypatch, capsys):
    if case == "prefix-read-only-fs":
        try:  # sysfs: read-only in containers (EROFS), not writable by users elsewhere (EPERM/EACCES)
            os.mkdir("/sys/lorastrap-env")
            os.rmdir("/sys/lorastrap-env")
            pytest.skip("no read-only folder here (/sys is writable)")
        except OSError:
            pass
    sub = _setup(tmp_path)
    monkeypatch.setenv("LORASTRAP_QUIET", "1")
    monkeypatch.setenv("LORASTRAP_HOME", str(warm_home))
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v.format(**sub))
    args = [a.format(**sub) for a in argv]
    if argv[0] in ("install", "repair"):
        args += [] if "--channel" in argv else ["--channel", channel["url"]]
        args += [] if "--pip-index-url" in argv else ["--pip-index-url", channel["simple"]]
    if json_flag:
        args.insert(1, "--json") if argv[0] != "frobnicate" else args.append("--json")
    before = sorted(os.listdir(tmp_path))
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == code, f"{case}: exit {rc}, want {code}\n{err}"
    assert rc >= 2 and rc in errors.EXIT_CODES
    assert "internal error" not in err and "Traceback" not in err, err
    if rc != errors.DOCTOR_REPAIRABLE:
        assert err.startswith("error: ") and "\n  why: " in err and "\n  fix: " in err, err
    if json_flag:
        doc = json.loads(out)
        if rc == errors.DOCTOR_REPAIRABLE:
            assert doc["verdict"] == "repairable"
            codes = {f["code"] for f in doc["findings"]}
            assert {"replaced-files"} <= codes, doc
        else:
            assert doc["exit_code"] == rc and doc["what"] and doc["why"] and doc["fix"], doc
    # nothing left beside a refused path (lock files, half-made folders)
    assert sorted(os.listdir(tmp_path)) == before, set(os.listdir(tmp_path)) ^ set(before)
    assert not list(warm_home.parent.glob("*.lorastrap*")), list(warm_home.parent.glob("*.lorastrap*"))


def test_the_table_is_long_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("url_end", ["/", "/.."])
def test_a_lock_url_that_names_no_file_is_refused(url_end, warm_home, channel, tmp_path, monkeypatch, capsys):
    import yaml
    lock = warm_home / "locks" / "test-cpu.linux-64.conda-lock.yml"
    doc = yaml.safe_load(lock.read_text())
    entry = next(p for p in doc["package"] if p["name"] == "libzlib")
    entry["url"] = entry["url"].rsplit("/", 1)[0] + url_end
    lock.write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.setenv("LORASTRAP_HOME", str(warm_home))
    monkeypatch.setenv("LORASTRAP_QUIET", "1")
    rc = cli.main(I + ["--prefix", str(tmp_path / "p"), "--channel", channel["url"], "--pip-index-url",
                       channel["simple"]])
    err = capsys.readouterr().err
    assert rc == errors.CONFIG and "does not end in a file name" in err and "internal error" not in err, err
    assert not (tmp_path / "p").exists()


def test_a_hung_interpreter_is_found_in_the_start_timeout(tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "venv"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text("#!/bin/sh\nexec sleep 600\n")  # a Python that never starts
    os.chmod(prefix / "bin" / "python", 0o755)
    monkeypatch.setenv("LORASTRAP_PYTHON_START_TIMEOUT", "1")
    monkeypatch.setenv("LORASTRAP_QUIET", "1")
    rc = cli.main(["verify", "--prefix", str(prefix)])
    err = capsys.readouterr().err
    assert rc == errors.VERIFY and "did not start and exit within 1 s" in err, err
