"""The package as users get it: `pip install .` gives a `lorastrap` command that works away from the checkout,
reading the matrix and the verify script it carries inside (lorastrap/_data/)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_pip_install_gives_a_working_lorastrap_command(tmp_path):
    target = tmp_path / "site"
    # The runtime's dependencies are those of the test venv; the package itself is built and installed for real.
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=str(target))  # before the editable checkout on sys.path
    version = subprocess.run([str(target / "bin" / "lorastrap"), "--version"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("lorastrap "), version.stderr
    plan = subprocess.run([sys.executable, "-m", "lorastrap", "plan", "--json"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["plan"]["profile"]
    where = subprocess.run([sys.executable, "-c", "import lorastrap.core.paths as p; print(p.ENVS, p.VERIFY_SCRIPT.is_file())"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    envs, has_script = where.stdout.split()
    assert envs.startswith(str(target)) and has_script == "True"
