import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(*args, env=None, timeout=120, cwd=ROOT):
    """Run `python -m installer ARGS` as a user would, from the checkout."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "installer", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory):
    """Build tests/fake_nvml/libnvidia-ml.c into a folder to put on LD_LIBRARY_PATH."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libnvidia-ml.so.1")
    out = tmp_path_factory.mktemp("fake_nvml")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / "libnvidia-ml.so.1"),
                    str(ROOT / "tests" / "fake_nvml" / "libnvidia-ml.c")], check=True)
    return out
