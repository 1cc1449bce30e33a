"""conda package names ↔ PyPI distribution names, from the envs dir in use (ENVS/pypi-to-conda.json, conda-lock's
mapping format: {pypi_name: {"conda_name": ..., "pypi_name": ...}}; lorastrap's own envs/ file when that dir has
none); a name the mapping lacks is its own normalised name (PEP 503)."""

from __future__ import annotations

import json
from pathlib import Path

from packaging.utils import canonicalize_name

from lorastrap.core import paths
from lorastrap.core.errors import ConfigError
from lorastrap.core.plain import Struct, frozen_struct

MAPPING = "pypi-to-conda.json"


@frozen_struct
class NameMap(Struct):
    to_pypi: dict[str, str]  # conda name → PyPI name (normalised)
    to_conda: dict[str, str]  # PyPI name (normalised) → conda name

    def pypi(self, conda_name: str) -> str:
        return canonicalize_name(self.to_pypi.get(conda_name, conda_name))

    def conda(self, pypi_name: str) -> str:
        return self.to_conda.get(canonicalize_name(pypi_name), canonicalize_name(pypi_name))


def load(envs_dir: Path | None = None) -> NameMap:
    path = (envs_dir or paths.ENVS) / MAPPING
    if not path.exists():
        path = paths.ENVS / MAPPING
    try:
        raw = json.loads(path.read_text())
        pairs = [(v["conda_name"], canonicalize_name(v["pypi_name"])) for v in raw.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a conda-to-PyPI name mapping", why=str(exc).splitlines()[0],
                          fix="Restore pypi-to-conda.json from version control (conda-lock's mapping format).")
    return NameMap(to_pypi=dict(pairs), to_conda={p: c for c, p in pairs})
