"""Start-up: a command imports only what it uses.

Measured with `python -X importtime` (the sum of every module's own import time), as a ratio to the bare
interpreter's imports in the same run, runs interleaved, the fastest of each: the ratio holds on a loaded machine where wall
times do not.  Beside the budget, the modules a light command must never import are named (pydantic alone is ~20x
the bare interpreter; yaml, importlib.metadata and the install rooms are what a `detect` has no use for).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorastrap import cli

# command → (import budget as a multiple of the bare interpreter's, modules it must not import)
HEAVY = ("pydantic", "pydantic_core", "yaml", "importlib.metadata", "rattler", "conda_lock", "psutil",
         "lorastrap.install", "lorastrap.locking", "lorastrap.matrix", "lorastrap.care", "lorastrap.fleet")
BUDGETS = {
    ("--version",): (10.0, HEAVY),
    ("--help",): (10.0, HEAVY),
    ("detect", "--json"): (16.0, HEAVY + ("platform", "packaging")),  # os.uname() answers; dotted numbers need no PEP 440
}
# What `lorastrap install` imports before it works (the command, its orchestration, the transaction): the code it
# needs, none of what only checks or writes other files (pydantic, yaml: read from what an earlier check kept), nor
# py-rattler (its worker's) nor the day-two rooms, nor the transport (http.client, ssl: only when an archive is
# missing).  ~21x the bare interpreter's when this budget was set.
INSTALL_PATH_IMPORTS = "import lorastrap.cli.install, lorastrap.install.provision, lorastrap.machine.detect"
INSTALL_BUDGET = (30.0, ("pydantic", "pydantic_core", "yaml", "importlib.metadata", "rattler", "conda_lock", "psutil",
                         "html.parser", "lorastrap.care", "lorastrap.fleet", "lorastrap.locking.lock",
                         "lorastrap.locking.solve", "lorastrap.install.download", "http.client", "ssl", "platform",
                         "packaging"))
RUNS = 5


def imports(args: list[str]) -> tuple[int, set[str]]:
    """(sum of the modules' own import time in µs, the modules imported) of one `python -X importtime` run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # measure with bytecode cached
    res = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    total, names = 0, set()
    for line in res.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        if self_us.strip().isdigit():
            total += int(self_us)
            names.add(name.strip())
    return total, names


@pytest.fixture(scope="module")
def measured() -> dict:
    imports(["-m", "lorastrap", "--version"])  # bytecode written before anything is timed
    runs: dict = {"bare": []}
    names: dict = {}
    for _ in range(RUNS):
        runs["bare"].append(imports(["-c", "pass"])[0])
        for argv in BUDGETS:
            total, names[argv] = imports(["-m", "lorastrap", *argv])
            runs.setdefault(argv, []).append(total)
        total, names["install"] = imports(["-c", INSTALL_PATH_IMPORTS])
        runs.setdefault("install", []).append(total)
    # The fastest of the runs: load only ever adds time, so the minimum is the figure least disturbed by it.
    bare = min(runs["bare"])
    return {argv: (min(runs[argv]) / bare, names[argv]) for argv in [*BUDGETS, "install"]}


def _heavy(names: set[str], never: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in never or n.split(".")[0] in never or
                  any(n.startswith(h + ".") for h in never))


@pytest.mark.parametrize("argv", list(BUDGETS), ids=lambda a: " ".join(a))
def test_command_imports_within_budget(measured, argv):
    ratio, names = measured[argv]
    budget, never = BUDGETS[argv]
    heavy = _heavy(names, never)
    assert not heavy, f"`lorastrap {' '.join(argv)}` imports {heavy}: import them where they are used"
    assert ratio <= budget, (f"`lorastrap {' '.join(argv)}` imports cost {ratio:.1f}x the bare interpreter's "
                             f"(budget {budget}x): `python -X importtime -m lorastrap {' '.join(argv)}` says what")


def test_install_path_imports_within_budget(measured):
    ratio, names = measured["install"]
    budget, never = INSTALL_BUDGET
    heavy = _heavy(names, never)
    assert not heavy, f"the install path imports {heavy}: import them where they are used"
    assert ratio <= budget, (f"the install path's imports cost {ratio:.1f}x the bare interpreter's (budget {budget}x): "
                             f"`python -X importtime -c '{INSTALL_PATH_IMPORTS}'` says what")


def test_command_table_names_every_command():
    """cli.COMMANDS (which group a command's run builds) is the groups' own list, so no command is lost."""
    import argparse
    import importlib

    from lorastrap.cli import base
    found = {}
    for group in cli.GROUPS:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"lorastrap.cli.{group}").add(sub, base.parents())
        found.update({name: group for name in sub.choices})
    assert found == cli.COMMANDS


def test_narrow_parser_runs_the_named_command(capsys):
    """A run builds only its command's group, and the answers are the full parser's."""
    parser, commands = cli.parser(["detect", "--json"])
    assert set(commands) == {"detect", "plan"}
    full, all_commands = cli.parser([])
    assert set(all_commands) == set(cli.COMMANDS)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lorastrap ")
    assert cli.main(["no-such-command"]) == 2  # the full parser answers an unknown command


# What an install does with its records and the matrix, in a process of its own: on a warm cache of the checked
# profiles.yaml (the data dir's checked/), nothing of it needs pydantic, nor (for the matrix) yaml.
INSTALL_PATH = """
import json, sys
from lorastrap.core import records
from lorastrap.machine.model import Machine
from lorastrap.matrix import plan, profiles
matrix = profiles.load(keep=True)
result = plan.plan(Machine.model_validate_json(open(sys.argv[1]).read()), matrix)
parsed = "yaml" in sys.modules
import lorastrap.cli.install, lorastrap.install.provision, lorastrap.install.transaction  # noqa: E401
from lorastrap.install import bundles, prefix, txn  # noqa: F401
record = records.EnvRecord(profile=result.profile, platform="linux-64", lock_digest="d", lock_source="s", engine="e",
                           installed_at="t", plan=result.model_dump(mode="json", include={"profile", "reasons"}),
                           built_with=records.BuiltWith(channels=["c"], mirror={"c": "m"}))
journal = records.Journal(state="linking", had_old=True, pid=1)
report = records.NodeReport(host="h", ok=True, timings={"total": 1.5}, plan=result.model_dump(mode="json"),
                            machine={"platform": "linux-64", "driver": None, "driver_cuda": None, "gpus": ["g"]})
for r in (record, journal, report, result):
    assert type(r).model_validate_json(r.model_dump_json(indent=2)) == r
print(json.dumps({"profile": result.profile, "yaml": parsed,
                  "pydantic": sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core"))}))
"""


def test_install_path_without_pydantic_on_a_warm_matrix(tmp_path):
    from recorded_nvml import FIXTURES, load, machine
    machine_file = tmp_path / "machine.json"
    machine_file.write_text(machine(load(FIXTURES / "b200_driver-580--cuda12.json")).model_dump_json())
    env = dict(os.environ, LORASTRAP_HOME=str(tmp_path / "home"))
    runs = []
    for _ in range(2):  # the first fills the cache
        res = subprocess.run([sys.executable, "-c", INSTALL_PATH, str(machine_file)], capture_output=True, text=True,
                             env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout))
    assert len(list((tmp_path / "home" / "checked").glob("profiles.*.json"))) == 1
    assert runs[1] == {"profile": "cuda12", "yaml": False, "pydantic": []}, runs


# What `lorastrap install` imports before it starts the embedded engine's worker (lorastrap/__main__.py): each
# millisecond of it is one the worker starts later.  Not the records (dataclasses and typing: ~10 ms), nor the errors
# module, nor any room the install uses after that.
AHEAD_NEVER = ("dataclasses", "typing", "inspect", "argparse", "yaml", "email", "lorastrap.core.errors",
               "lorastrap.core.plain", "lorastrap.cli", "lorastrap.machine", "lorastrap.matrix", "lorastrap.locking",
               "lorastrap.install.engines", "lorastrap.install.cache")


def test_the_worker_started_ahead_waits_for_no_heavy_import():
    _, names = imports(["-c", "import lorastrap.install.ahead"])
    assert "lorastrap.core.subproc" in names  # the measure saw it
    assert not _heavy(names, AHEAD_NEVER), _heavy(names, AHEAD_NEVER)


# What a real install of a new environment must not import in lorastrap's own process, measured while it runs (the
# budget above covers the modules' top-level imports only; these came in through functions): yaml (the engine's
# lock is JSON), importlib.metadata with email and socket (py-rattler's release, the pip entries' check, the
# no-op stamp), the transport (nothing to download), pydantic, and py-rattler (the worker's).
RUNTIME_NEVER = ("yaml", "importlib.metadata", "email", "socket", "secrets", "http.client", "ssl", "pydantic",
                 "pydantic_core", "rattler", "packaging.tags",
                 "concurrent.futures", "logging",  # the thread beside the pip step is a plain one (~4 ms)
                 "uv", "sysconfig")  # the pip step finds the runtime's uv without its wheel's finder (~5 ms)


def test_a_warm_install_imports_none_of_the_heavy_modules_while_it_runs(channel, warm_home, tmp_path):
    from conftest import ROOT, run_cli
    args = ("install", "--envs-dir", str(ROOT / "tests" / "envs"), "--channel", channel["url"], "--pip-index-url", channel["simple"],
            "--engine", "rattler", "--no-verify", "--json")
    first = run_cli(*args, "--prefix", str(tmp_path / "first"))  # fills the extracted copies: the next is warm
    assert first.returncode == 0, first.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorastrap", *args, "--prefix",
                          str(tmp_path / "env")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["changed"], res.stderr[-2000:]
    names = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "lorastrap.install.transaction" in names  # the measure saw the install's own imports
    order = [line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
    assert order.index("lorastrap.install.ahead") < order.index("lorastrap.cli")  # the worker was started first
    assert not _heavy(names, RUNTIME_NEVER), _heavy(names, RUNTIME_NEVER)


# The worker itself: before its first request it loads py-rattler's compiled module alone (rattler_worker._native),
# not the package's __init__ with its wrappers of every API — 25-30 ms of the ~95 ms a warm install waited for it.
# The module is loaded once: a later `import rattler` (a solve in lorastrap's own process) must find that one.
WORKER_START = """
import sys
from lorastrap.locking import rattler_worker
rattler_worker._asyncio_without_tls()  # what its main() does first
native = rattler_worker._native()
paths = "pathlib" in sys.modules  # a worker that only links has no use for it (~3 ms)
alone = sorted(m for m in sys.modules if m == "rattler" or m.startswith("rattler."))
tls = "ssl" in sys.modules or "asyncio" not in sys.modules  # asyncio came, without its TLS transports (~5 ms)
import rattler  # the package's wrappers then work on that same module
import ssl  # importable still
print(alone, sys.modules["rattler.rattler"] is native, str(rattler.Version("1.2")), hasattr(native, "py_install"),
      tls, ssl.PROTOCOL_TLS_CLIENT > 0, paths, flush=True)
import os
os._exit(0)
"""


def test_the_worker_loads_the_engine_without_its_python_wrappers():
    res = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["['rattler.rattler']", "True", "1.2", "True", "False", "True", "False"], res.stdout
