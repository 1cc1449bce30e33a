"""Jetson boards: the L4T release files read (no driver call), the release → JetPack/CUDA table (envs/jetson.yaml,
each row with its source), and what detect says about a board."""

from __future__ import annotations

import re
from pathlib import Path
from lorastrap.core import yamlio
from lorastrap.core.errors import ConfigError, Finding
from lorastrap.machine.host import read
from lorastrap.machine.model import Jetson


def tegra_facts(root: Path = Path("/")) -> dict | None:
    """The Jetson release files (no driver call: read here, not in a child); None when this is no Jetson."""
    release = read(str(root / "etc" / "nv_tegra_release"))
    model = read(str(root / "proc" / "device-tree" / "model"))
    if release is None:
        return None
    return {"nv_tegra_release": release, "model": model.strip("\0 \n") if model else None}


def l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' → '36.4.3'."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2).strip('.')}" if match else None


def _table_model():
    """The model of envs/jetson.yaml (pydantic, built only when the table is read: on a Jetson)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class L4tRelease(BaseModel):
        model_config = ConfigDict(extra="forbid")
        release: str = Field(pattern=r"^\d+(\.\d+)*$", description="an L4T release or its prefix (36.4 = 36.4.x)")
        jetpack: str
        cuda: str = Field(pattern=r"^\d+\.\d+$", description="the CUDA that release ships")
        source: str

    class JetsonTable(BaseModel):
        model_config = ConfigDict(extra="forbid")
        schema_version: Literal[1]
        l4t: list[L4tRelease]

    return JetsonTable


def table(envs_dir: Path | None = None) -> list[dict]:
    """envs/jetson.yaml's rows, checked; a broken file is a ConfigError naming it."""
    import yaml
    from pydantic import ValidationError
    JetsonTable = _table_model()  # noqa: N806

    from lorastrap.core import paths
    path = (envs_dir or paths.ENVS) / "jetson.yaml"
    try:
        return [row.model_dump() for row in JetsonTable.model_validate(yamlio.load(path.read_text())).l4t]
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path}: cannot be read as the L4T release table",
                          why=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                          fix="Restore envs/jetson.yaml from git, or correct the field named.") from None


def board(tegra: dict, table: list[dict]) -> Jetson:
    release = l4t_release(tegra.get("nv_tegra_release") or "")
    row = None
    if release:
        rows = [r for r in table if release == r["release"] or release.startswith(r["release"] + ".")]
        row = max(rows, key=lambda r: len(r["release"]), default=None)
    return Jetson(model=tegra.get("model"), l4t=release, jetpack=row and row["jetpack"], cuda=row and row["cuda"],
                  source=row and row["source"])


def finding(board: Jetson, gpu_found: bool) -> Finding:
    what = (f"Jetson board: {board.model or 'unknown model'}, L4T {board.l4t or '?'}"
            + (f" (JetPack {board.jetpack}, CUDA {board.cuda})" if board.cuda else ""))
    if board.l4t and not board.cuda:
        what += "; this L4T release is not in envs/jetson.yaml"
    if gpu_found:
        return Finding(severity="info", code="jetson", what=what,
                       why="before JetPack 6 Jetson has no NVML, and its NVML answers little; the integrated GPU is "
                       "reached through libcuda (the Tegra driver)")
    return Finding(severity="warning", code="jetson-no-libcuda", what=what + "; libcuda did not answer",
                   why="libcuda (the Tegra driver) is the way to a Jetson's GPU (NVML is absent before JetPack 6)",
                   fix="In a container, start it with `--runtime nvidia` so the Tegra driver is mounted; on the "
                       "board, reinstall the nvidia-l4t-cuda package.")
