import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A test run started as an asynchronous list of a shell without job control (`cmd &` in a script, as CI runners and
# nohup do) inherits SIGINT ignored, and so would every lorastrap it starts — which then rightly keeps ignoring it
# (a process started with SIGINT ignored is meant to be immune to Ctrl-C).  The tests that interrupt lorastrap with
# SIGINT need it honoured: their children get the default disposition back (an exec resets a handled signal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "installer"))  # also importable without the editable install

# Tests never write into the real HOME: every process they start (lorastrap, micromamba, conda-lock, uv, pip,
# shells) gets a temporary HOME and XDG data/config/state folders for the session.  Caches stay where they are
# (XDG_CACHE_HOME: pip's and uv's downloads), so a session does not fetch everything again.  At the end, the
# places tools are known to write to in a HOME are compared with how they were: a change fails the run.
REAL_HOME = Path(os.path.expanduser("~")).absolute()
WATCHED = (".conda", ".condarc", ".mambarc", ".local/share", ".local/bin", ".local/state", ".config", ".profile",
           ".bashrc", ".bash_profile", ".bash_login", ".zshenv", ".zshrc")


def home_snapshot(home: Path = REAL_HOME, limit: int = 50000) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the watched files and folders under HOME (a folder's mtime changes when an entry is
    added or removed in it)."""
    out: dict[str, tuple[int, int]] = {}
    for rel in WATCHED:
        top = home / rel
        if not top.exists() and not top.is_symlink():
            continue
        for root, dirs, files in os.walk(top) if top.is_dir() else [(str(top.parent), [], [top.name])]:
            for name in [""] + files if top.is_dir() else files:
                p = Path(root) / name if name else Path(root)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                out[str(p)] = (st.st_mtime_ns, st.st_size if not p.is_dir() else 0)
                if len(out) >= limit:
                    return out
    return out


def _isolate_home() -> None:
    import tempfile
    if os.environ.get("LORASTRAP_TEST_HOME"):
        return  # already isolated (a pytest started by a test)
    home = Path(tempfile.mkdtemp(prefix="lorastrap-tests-home-"))
    os.environ.setdefault("XDG_CACHE_HOME", str(REAL_HOME / ".cache"))  # before HOME moves: the real caches
    for var, sub in (("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share"),
                     ("XDG_STATE_HOME", ".local/state"), ("XDG_BIN_HOME", ".local/bin")):
        os.environ[var] = str(home / sub)
    os.environ["HOME"] = os.environ["LORASTRAP_TEST_HOME"] = str(home)
    os.environ.pop("ZDOTDIR", None)


_BEFORE = home_snapshot()
_isolate_home()


def pytest_sessionfinish(session, exitstatus):
    after = home_snapshot()
    changed = sorted(p for p in set(_BEFORE) | set(after) if _BEFORE.get(p) != after.get(p))
    if changed and not os.environ.get("LORASTRAP_TEST_ALLOW_HOME_CHANGES"):
        print(f"\nthe real HOME ({REAL_HOME}) changed during the tests: " + ", ".join(changed[:10])
              + " (tests must write only into their temporary HOME; another process on this machine may also "
                "have changed it: LORASTRAP_TEST_ALLOW_HOME_CHANGES=1 skips this check)", file=sys.stderr)
        session.exitstatus = 1


def _has_nvidia_driver() -> bool:
    from lorastrap.machine import libfind
    return any(libfind.find(so, environ=dict(os.environ)) for so in ("libnvidia-ml.so.1", "libcuda.so.1"))


# Tests of what this machine really answers when it has no NVIDIA driver (the CI machines): on a GPU node, where
# users of lorastrap also run these tests, they are skipped (the recorded machines cover the GPU answers).
no_nvidia_driver = pytest.mark.skipif(_has_nvidia_driver(), reason="this machine has an NVIDIA driver library; the "
                                                                   "no-driver answers are tested where there is none")


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def dies_within(pid: int, seconds: float) -> bool:
    """Wait up to SECONDS for the process to be gone; whether it is."""
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def run_cli(*args, env=None, timeout=120, cwd=ROOT, input=None):
    """Run `python -m lorastrap ARGS` as a user would (the package is installed editable in the test venv)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lorastrap", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd, input=input)


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory):
    """Build tests/fake_nvml/libnvidia-ml.c into a folder to put on LD_LIBRARY_PATH."""
    return _build_standin(tmp_path_factory, "libnvidia-ml.c", "libnvidia-ml.so.1")


def _build_standin(factory, source: str, soname: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip(f"no C compiler to build the stand-in {soname}")
    out = factory.mktemp(soname.split(".")[0])
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / soname), str(ROOT / "tests" / "fake_nvml" / source)],
                   check=True)
    return out


@pytest.fixture(scope="session")
def fake_cuda_lib(tmp_path_factory):
    """Build tests/fake_nvml/libcuda.c into a folder of its own (libcuda.so.1)."""
    return _build_standin(tmp_path_factory, "libcuda.c", "libcuda.so.1")


sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def channel(tmp_path_factory):
    """The test channel (real .conda packages) and pip index, built once, served on 127.0.0.1."""
    import testchannel
    out = tmp_path_factory.mktemp("testchannel")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "build", str(out)], check=True,
                   capture_output=True, timeout=300)
    server, url = testchannel.serve(out)
    yield {"root": out, "dir": out / "channel", "url": f"{url}/channel", "simple": f"{url}/simple", "base": url}
    server.shutdown()


def _micromamba() -> Path | None:
    """The real micromamba: ../shared/tools/micromamba (CI has it), else MAMBA_EXE, else on PATH."""
    for cand in (ROOT.parent / "shared" / "tools" / "micromamba" / "bin" / "micromamba", os.environ.get("MAMBA_EXE"),
                 shutil.which("micromamba"), shutil.which("mamba")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


MAMBA = _micromamba()
ENGINES = ["rattler", pytest.param("micromamba", marks=pytest.mark.skipif(
    MAMBA is None, reason="no micromamba (not at ../shared/tools/micromamba/bin, MAMBA_EXE or on PATH)"))]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Each engine in turn, for every lorastrap run the test starts (LORASTRAP_ENGINE, MAMBA_EXE)."""
    monkeypatch.setenv("LORASTRAP_ENGINE", request.param)
    if request.param == "rattler":
        monkeypatch.delenv("MAMBA_EXE", raising=False)
    else:
        monkeypatch.setenv("MAMBA_EXE", str(MAMBA))
    return request.param


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh lorastrap data dir (cache, locks, envs) for one test: the first run on a new machine."""
    monkeypatch.setenv("LORASTRAP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORASTRAP_PKGS_DIR", raising=False)
    monkeypatch.setenv("CONDA_OVERRIDE_CUDA", "")  # a CPU machine, whatever this one has (tests set 12.4 for GPU)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def session_state(channel, tmp_path_factory):
    """The test profiles locked once (test-cpu and test-cuda for linux-64, against the test channel) and their
    archives downloaded and checked once, by real `lorastrap install` runs."""
    root = tmp_path_factory.mktemp("session-state")
    env = {k: v for k, v in os.environ.items() if k != "LORASTRAP_PKGS_DIR"}
    env["LORASTRAP_HOME"] = str(root / "home")
    for extra in ({"CONDA_OVERRIDE_CUDA": ""}, {"CONDA_OVERRIDE_CUDA": "12.4"}):
        res = subprocess.run([sys.executable, "-m", "lorastrap", "install", "--envs-dir", str(ROOT / "tests" / "envs"),
                              "--channel", channel["url"], "--pip-index-url", channel["simple"], "--no-verify",
                              "--prefix", str(root / "env")], capture_output=True, text=True, timeout=600,
                             env={**env, **extra}, cwd=ROOT)
        assert res.returncode == 0, res.stderr
    return root / "home"


@pytest.fixture
def warm_home(home, session_state):
    """A fresh data dir holding the session's locks and checked archives (hard links: the cache's archives are
    never written in place), as on a machine that installed before.  Extracted packages are not shared: each test
    extracts its own, so a test that edits a file of its environment cannot reach another test."""
    shutil.copytree(session_state / "locks", home / "locks")
    shutil.copytree(session_state / "pkgs" / "archives", home / "pkgs" / "archives", copy_function=os.link)
    return home


def _venv(path, requirements):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    res = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "-r", str(requirements)], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"could not create {path} from {requirements}:\n{res.stderr[-2000:]}")
    return path


def _session_venv(factory, variable: str, requirements: str) -> Path:
    """A venv from tests/REQUIREMENTS, created once per run; the variable names an existing one to reuse."""
    given = os.environ.get(variable)
    if given:
        return Path(given)
    return _venv(factory.mktemp(requirements.split(".")[0]) / "venv", ROOT / "tests" / requirements)


@pytest.fixture(scope="session")
def ml_venv(tmp_path_factory):
    """A real CPU environment with the current LoRA stack."""
    return _session_venv(tmp_path_factory, "LORASTRAP_ML_VENV", "requirements-ml.txt")


@pytest.fixture(scope="session")
def venv_2023(tmp_path_factory):
    """The 2023 article's pins in a venv."""
    return _session_venv(tmp_path_factory, "LORASTRAP_2023_VENV", "requirements-2023.txt")


@pytest.fixture(scope="session")
def ansible_venv(tmp_path_factory):
    """ansible-core (< 2.20 on Python 3.11) in its own venv."""
    return _session_venv(tmp_path_factory, "LORASTRAP_ANSIBLE_VENV", "requirements-ansible.txt")


@pytest.fixture
def growing_channel(channel, tmp_path):
    """A copy of the test channel, served on its own port, that a test can publish a newer release into."""
    import testchannel
    root = tmp_path / "tc"
    shutil.copytree(channel["root"], root)
    server, url = testchannel.serve(root)

    def publish(name, version):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "testchannel.py"), "publish", str(root), name,
                        version], check=True, capture_output=True, timeout=120)
    yield {"url": f"{url}/channel", "simple": f"{url}/simple", "publish": publish}
    server.shutdown()


def rattler_extract(into: dict) -> None:
    """py-rattler's own extract of each archive into its folder ({folder: archive}), in a process of its own (it
    may crash at shutdown: the process leaves before that)."""
    code = ("import os, sys\nfrom rattler.package_streaming import extract\n"
            "for folder, archive in zip(sys.argv[1::2], sys.argv[2::2]):\n    extract(archive, folder)\n"
            "sys.stdout.flush()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, *[str(p) for pair in into.items() for p in pair]], check=True,
                   timeout=300)


def unpacked_tree(folder: Path) -> dict:
    """Everything an unpacked copy holds, as the link step sees it: each entry's type, permission bits, size, bytes
    (sha256), a file's mtime, a link's target, and which files are one (hard links)."""
    import hashlib
    import stat
    out, inodes = {}, {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(folder))
        kind = stat.S_IFMT(st.st_mode)
        out[rel] = (kind, oct(stat.S_IMODE(st.st_mode)) if kind != stat.S_IFLNK else None,
                    st.st_size if kind == stat.S_IFREG else None,
                    hashlib.sha256(p.read_bytes()).hexdigest() if kind == stat.S_IFREG else None,
                    int(st.st_mtime) if kind == stat.S_IFREG else None,
                    os.readlink(p) if kind == stat.S_IFLNK else None,
                    inodes.setdefault(st.st_ino, rel) if kind == stat.S_IFREG else None)
    return out
