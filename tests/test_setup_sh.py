"""setup.sh: POSIX sh (run by dash), end to end against the test channel, piped mode, downloader, failures."""

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import ROOT

DASH = shutil.which("dash") or "/bin/sh"
TEST_ENVS = "tests/envs"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A clean copy of the project as a clone would have it (tracked + untracked-not-ignored files)."""
    dest = tmp_path_factory.mktemp("clone") / "lorastrap"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One data dir for the module, so the runtime is created once and reused (as on a real machine)."""
    return tmp_path_factory.mktemp("data") / "lorastrap"


def sh(args, *, cwd, env, stdin=None, timeout=900):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("LORASTRAP_", "CONDA_OVERRIDE", "XDG_")) and k != "ZDOTDIR"}
    full.update(env)
    return subprocess.run(args, cwd=cwd, env=full, input=stdin, capture_output=True, timeout=timeout,
                          text=isinstance(stdin, str) or stdin is None)


def snapshot(root: Path, skip=("logs",)):
    """Every file's mtime, but Python's own bytecode caches (a run from a checkout imports lorastrap from it, and
    the interpreter writes __pycache__ there unless PYTHONDONTWRITEBYTECODE is set; .gitignore has them)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if (rel.parts and rel.parts[0] in skip) or "__pycache__" in rel.parts:
            continue
        if p.name.endswith(".lock"):  # file locks: taken (and stamped with the holder's pid) on every run
            continue
        if p.is_file() and not p.is_symlink():
            out[str(rel)] = p.stat().st_mtime_ns
    return out


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed (.ci/run installs it from Debian)")
        pytest.skip("shellcheck not installed here (.ci/run installs it)")
    res = subprocess.run(["shellcheck", "-s", "sh", str(ROOT / "setup.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_end_to_end_under_dash_then_a_rerun_changes_nothing(checkout, data_dir, channel, tmp_path):
    args = [DASH, "setup.sh", "--envs-dir", TEST_ENVS, "--channel", channel["url"],
            "--pip-index-url", channel["simple"]]
    env = {"LORASTRAP_HOME": str(data_dir), "HOME": str(tmp_path)}
    res = sh(args, cwd=checkout, env=env, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "installed and verified:" in res.stdout and "profile test-cpu" in res.stdout
    assert "run in it:   lorastrap run -- python train.py" in res.stdout
    assert 'activate it: eval "$(lorastrap shell-hook)"' in res.stdout
    assert (data_dir / "runtime" / "bin" / "python").exists()
    before = snapshot(data_dir)
    res = sh(args, cwd=checkout, env=env, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reusing the runtime" in res.stderr and "already up to date" in res.stdout
    assert snapshot(data_dir) == before


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def login(home: Path, command: str, shell: str = "bash"):
    """A new login shell of a user whose HOME is HOME, with the system's PATH only."""
    return subprocess.run([shell, "-lc", command], capture_output=True, text=True, timeout=120,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "dumb"})


def test_the_command_on_the_path_once_then_self_uninstall_leaves_nothing(checkout, data_dir, channel, tmp_path):
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    if (data_dir / "runtime").is_dir():  # the module's runtime, as a machine that ran setup.sh before has it
        shutil.copytree(data_dir / "runtime", data / "runtime", symlinks=True, copy_function=os.link)
    args = [DASH, "setup.sh", "--envs-dir", TEST_ENVS, "--channel", channel["url"], "--pip-index-url", channel["simple"]]
    # pip runs `rustc --version` for its user agent, and a rustup proxy on PATH writes ~/.rustup: not ours to judge.
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if ".cargo" not in d)
    env = {"LORASTRAP_HOME": str(data), "HOME": str(home), "PATH": path}
    res = sh(args, cwd=checkout, env=env, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"added {home}/.local/bin to the PATH in {home}/.profile" in res.stderr
    res = login(home, "lorastrap --version && lorastrap list")  # a new terminal finds it, and the data dir
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("lorastrap ") and f"{data}/envs/lora" in res.stdout and "health: ok" in res.stdout
    res = sh(args, cwd=checkout, env=env, stdin="")  # again: the PATH line is there once
    assert res.returncode == 0, res.stderr[-3000:]
    profile = (home / ".profile").read_text()
    assert profile.count("# added by lorastrap setup.sh") == 1 and f". '{data}/env'" in profile
    res = login(home, "lorastrap self uninstall")  # not a terminal and no --yes: refuses, removes nothing
    assert res.returncode == 2 and "--yes" in res.stderr and (data / "envs" / "lora").exists()
    res = login(home, "lorastrap self uninstall --yes")
    assert res.returncode == 0, res.stderr
    assert "runtime" in res.stderr and f"launcher {home}/.local/bin/lorastrap" in res.stderr
    assert tree(home) == [] and not data.exists()


def test_no_modify_path_touches_no_profile(checkout, data_dir, channel, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    res = sh([DASH, "setup.sh", "--envs-dir", TEST_ENVS, "--channel", channel["url"], "--pip-index-url",
              channel["simple"], "--no-modify-path"], cwd=checkout,
             env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home)}, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree(home) == [".bashrc", ".local", ".local/bin", ".local/bin/lorastrap"]
    assert (home / ".bashrc").read_text() == "# mine\n"
    assert f'export PATH="{home}/.local/bin:$PATH"' in res.stderr
    res = subprocess.run([str(home / ".local" / "bin" / "lorastrap"), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lorastrap ")


def test_dry_run_writes_nothing_outside_the_data_dir(checkout, data_dir, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    tree_before = snapshot(checkout)
    data_before = snapshot(data_dir, skip=("logs", "runtime"))
    res = sh([DASH, "setup.sh", "--dry-run"], cwd=checkout,
             env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home), "TMPDIR": str(tmp)}, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NVML" in res.stdout and "LibraryNotFound" in res.stdout  # the detection
    assert "profile: cpu" in res.stdout  # the plan
    assert snapshot(checkout) == tree_before
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []
    assert snapshot(data_dir, skip=("logs", "runtime")) == data_before


def test_a_truncated_download_executes_nothing(tmp_path):
    text = (ROOT / "setup.sh").read_bytes()
    last_line = text.rstrip(b"\n").rsplit(b"\n", 1)[1]
    assert last_line == b'main "$@" || exit $?'
    # Any cut before `main` is complete runs nothing (a cut after it has the whole script anyway).
    limit = len(text) - len(last_line) - 1 + len(b"mai")
    offsets = sorted(set(list(range(0, limit, max(1, limit // 150))) + [limit - 1, limit]))
    for n in offsets:
        data = tmp_path / f"d{n}"
        res = subprocess.run([DASH], input=text[:n], capture_output=True, timeout=30,
                             env={"PATH": os.environ["PATH"], "LORASTRAP_HOME": str(data), "HOME": str(tmp_path)})
        assert not data.exists(), f"cut at byte {n} created the data dir"
        assert b"lorastrap:" not in res.stderr and b"lorastrap" not in res.stdout, f"cut at {n}: {res.stderr!r}"


# --- piped mode and the downloader, against a loopback server ----------------------------------------------------

class Files(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    hits: list = []

    def do_GET(self):
        Files.hits.append((self.path, self.headers.get("User-Agent", "")))
        route = Files.routes.get(self.path)
        if callable(route):
            route = route()
        if route is None:
            self.send_error(404)
            return
        code, body = route
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server(checkout, tmp_path_factory):
    archive = tmp_path_factory.mktemp("src") / "lorastrap.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(checkout.parent), checkout.name], check=True)
    body = archive.read_bytes()
    flaky = {"n": 0}

    def flaky_route():
        flaky["n"] += 1
        return (503, b"busy") if flaky["n"] <= 2 else (200, body)
    Files.routes = {"/src.tar.gz": (200, body), "/empty.tar.gz": (200, b""), "/flaky.tar.gz": flaky_route}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{srv.server_address[1]}", "sha": hashlib.sha256(body).hexdigest()}
    srv.shutdown()


def piped(server, tmp_path, data_dir, path_name, *, sha=None, path=None):
    env = {"LORASTRAP_HOME": str(data_dir), "HOME": str(tmp_path), "LORASTRAP_SOURCE_URL": server["url"] + path_name}
    if sha:
        env["LORASTRAP_SOURCE_SHA256"] = sha
    if path:
        env["PATH"] = path
    script = (ROOT / "setup.sh").read_text()
    return sh([DASH, "-s", "--", "--dry-run"], cwd=tmp_path, env=env, stdin=script)


def test_piped_install_fetches_checks_and_runs_the_source(server, tmp_path, data_dir):
    res = piped(server, tmp_path, data_dir, "/src.tar.gz", sha=server["sha"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fetching lorastrap from" in res.stderr and "profile: cpu" in res.stdout
    assert "UNCHECKED" not in res.stderr


def test_piped_install_without_a_checksum_says_so_loudly(server, tmp_path, data_dir):
    res = piped(server, tmp_path, data_dir, "/src.tar.gz")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: UNCHECKED SOURCE: LORASTRAP_SOURCE_SHA256 is not set" in res.stderr
    assert server["sha"] in res.stderr and "LORASTRAP_SOURCE_SHA256" in res.stderr


def test_piped_the_command_keeps_working_after_the_download_is_gone(server, tmp_path, data_dir, channel):
    home = tmp_path / "home"
    home.mkdir()
    env = {"LORASTRAP_HOME": str(data_dir), "HOME": str(home), "LORASTRAP_SOURCE_URL": server["url"] + "/src.tar.gz",
           "LORASTRAP_SOURCE_SHA256": server["sha"]}
    res = sh([DASH, "-s", "--", "--envs-dir", str(ROOT / TEST_ENVS), "--channel", channel["url"], "--pip-index-url",
              channel["simple"], "--no-modify-path"], cwd=tmp_path, env=env, stdin=(ROOT / "setup.sh").read_text())
    assert res.returncode == 0, res.stderr[-3000:]
    pth = next((data_dir / "runtime" / "lib").glob("python3*/site-packages/lorastrap-source.pth")).read_text()
    assert pth.startswith(f"{data_dir}/src/")  # the unpacked source lives in the data dir, not in a download
    res = subprocess.run([str(home / ".local" / "bin" / "lorastrap"), "list"], capture_output=True, text=True,
                         env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert res.returncode == 0 and f"{data_dir}/envs/lora" in res.stdout, res.stderr


def test_checksum_mismatch_is_refused_with_want_and_got(server, tmp_path, data_dir):
    res = piped(server, tmp_path, data_dir, "/src.tar.gz", sha="0" * 64)
    assert res.returncode == 6, res.stderr
    assert f"want: {'0' * 64}" in res.stderr and f"got:  {server['sha']}" in res.stderr


def test_empty_download_is_refused(server, tmp_path, data_dir):
    res = piped(server, tmp_path, data_dir, "/empty.tar.gz")
    assert res.returncode == 5 and "is empty" in res.stderr


def test_server_errors_are_retried(server, tmp_path, data_dir):
    Files.hits.clear()
    res = piped(server, tmp_path, data_dir, "/flaky.tar.gz", sha=server["sha"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p for p, _ in Files.hits].count("/flaky.tar.gz") == 3


def tools_dir(tmp_path, *names):
    """A PATH folder holding only the named programs (to take curl, wget or python3 away)."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name in names:
        target = shutil.which(name)
        if target:
            (d / name).symlink_to(target)
    return str(d)


BASICS = ("sh", "dash", "uname", "mktemp", "chmod", "rm", "mkdir", "cat", "cut", "sha256sum", "dirname", "date",
          "tee", "tar", "gzip", "mv", "ls", "env")


def test_without_curl_wget_is_used(server, tmp_path, data_dir):
    if not shutil.which("wget"):
        pytest.skip("wget is not installed")
    Files.hits.clear()
    path = tools_dir(tmp_path, *BASICS, "wget", "python3")
    res = piped(server, tmp_path, data_dir, "/src.tar.gz", sha=server["sha"], path=path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Files.hits and all(ua.lower().startswith("wget") for _, ua in Files.hits)


def test_without_curl_and_wget_a_clear_message(server, tmp_path, data_dir):
    path = tools_dir(tmp_path, *BASICS, "python3")
    res = piped(server, tmp_path, data_dir, "/src.tar.gz", path=path)
    assert res.returncode == 10 and "need curl or wget" in res.stderr


def test_no_python_and_no_micromamba_a_clear_message(checkout, server, tmp_path):
    path = tools_dir(tmp_path, *BASICS, "curl")
    res = sh([DASH, "setup.sh", "--dry-run"], cwd=checkout,
             env={"LORASTRAP_HOME": str(tmp_path / "fresh"), "HOME": str(tmp_path), "PATH": path,
                  "LORASTRAP_MICROMAMBA_URL": server["url"] + "/no-such-micromamba"}, stdin="")
    assert res.returncode == 10, res.stderr
    assert "no python3 >= 3.10" in res.stderr and "Ways out" in res.stderr and "MAMBA_EXE" in res.stderr


def test_help_lists_flags_and_variables():
    res = subprocess.run([DASH, str(ROOT / "setup.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag, var in (("--prefix", "LORASTRAP_PREFIX"), ("--dry-run", "LORASTRAP_DRY_RUN"),
                      ("--mirror", "LORASTRAP_MIRROR"), ("--report", "LORASTRAP_REPORT")):
        assert flag in res.stdout and var in res.stdout


def test_unknown_flag_is_a_usage_error():
    res = subprocess.run([DASH, str(ROOT / "setup.sh"), "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown flag '--bogus'" in res.stderr


def test_a_noexec_tmpdir_is_detected_and_avoided(checkout, data_dir, tmp_path):
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs", str(noexec)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a noexec tmpfs here: {mounted.stderr.strip()}")
    try:
        res = sh([DASH, "setup.sh", "--dry-run"], cwd=checkout,
                 env={"LORASTRAP_HOME": str(data_dir), "HOME": str(tmp_path), "TMPDIR": str(noexec)}, stdin="")
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"{noexec} is mounted noexec; using {data_dir}/tmp instead" in res.stderr
        assert list(noexec.iterdir()) == []
    finally:
        subprocess.run(["umount", str(noexec)], capture_output=True)


# --- setup.sh speaks the CLI's language ----------------------------------------------------------------------

def test_flags_as_the_cli_spells_them_are_passed_through(checkout, data_dir, channel, tmp_path):
    import json
    home = tmp_path / "home"
    home.mkdir()
    prefix, report = tmp_path / "env", tmp_path / "report.json"
    logs_before = set((data_dir / "logs").glob("*.log")) if (data_dir / "logs").is_dir() else set()
    res = sh([DASH, "setup.sh", f"--envs-dir={TEST_ENVS}", f"--channel={channel['url']}",
              f"--pip-index-url={channel['simple']}", f"--prefix={prefix}", "--no-verify", "--keep-backup",
              "--link-mode=copy", "--no-wait", "--min-free-mib=1", "--debug", "--json", f"--report={report}"],
             cwd=checkout, env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home)}, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out == json.loads(report.read_text()) and out["prefix"] == str(prefix) and out["verify"] is None
    built = json.loads((prefix / "conda-meta" / "lorastrap" / "record.json").read_text())["built_with"]
    assert built["link_mode"] == "copy" and built["pip_index_url"] == channel["simple"]
    (log,) = set((data_dir / "logs").glob("*.log")) - logs_before  # a successful run's log is not empty
    text = log.read_text()
    assert "lorastrap: platform linux-64" in text and "linking" in text and "installed" in text


def test_argument_errors_with_json_print_json_and_change_nothing(checkout, tmp_path):
    import json
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    for args, what in ((["--debug=1"], "--debug takes no value"), (["--bogus"], "unknown flag '--bogus'"),
                       (["--link-mode", "symlink"], "--link-mode 'symlink'"),
                       (["--min-free-mib=lots"], "--min-free-mib 'lots'"),
                       (["--dry-run", "--report", str(tmp_path / "missing" / "r.json")], "does not exist")):
        res = sh([DASH, "setup.sh", *args, "--json"], cwd=checkout,
                 env={"LORASTRAP_HOME": str(data), "HOME": str(home)}, stdin="")
        assert res.returncode == 2, (args, res.stderr)
        err = json.loads(res.stdout)
        assert err["exit_code"] == 2 and err["error"] == "UsageError" and what in err["what"], err
        assert not data.exists() and tree(home) == [] and not (tmp_path / "missing").exists()


def test_dry_run_writes_its_report(checkout, data_dir, tmp_path):
    import json
    home = tmp_path / "home"
    home.mkdir()
    res = sh([DASH, "setup.sh", "--dry-run", "--report", str(tmp_path / "plan.json")], cwd=checkout,
             env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home)}, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["check_mode"] is True and doc["ok"] is True and doc["plan"]["profile"] == "cpu"
    assert doc["schema_version"] == 1 and tree(home) == []


def test_a_failed_install_leaves_the_shell_profiles_and_launcher_alone(checkout, data_dir, channel, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    res = sh([DASH, "setup.sh", "--yes", "--envs-dir", TEST_ENVS, "--channel", channel["url"], "--pip-index-url",
              channel["simple"], "--profile", "no-such-profile"], cwd=checkout,
             env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home)}, stdin="")
    assert res.returncode == 2, res.stderr[-3000:]
    assert tree(home) == [".bashrc"] and (home / ".bashrc").read_text() == "# mine\n"
    assert "left as they were" in res.stderr


def test_no_modify_path_names_the_files_setup_sh_would_write(checkout, data_dir, channel, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    res = sh([DASH, "setup.sh", "--envs-dir", TEST_ENVS, "--channel", channel["url"], "--pip-index-url",
              channel["simple"], "--no-modify-path", "--no-verify"], cwd=checkout,
             env={"LORASTRAP_HOME": str(data_dir), "HOME": str(home)}, stdin="")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "~/.zshenv for zsh" in res.stderr and "~/.zshrc" not in res.stderr
    # the hints name the command by the path that works: its folder is not on the PATH
    assert f"run in it:   {home}/.local/bin/lorastrap run" in res.stdout, res.stdout
