"""The compatibility matrix: envs/profiles.yaml loaded into strict models (unknown keys are rejected).

The JSON schema of the file is committed as envs/schemas/profiles.schema.json; tests regenerate and compare it.
Every rule carries its source.  Errors name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorastrap.core import paths
from lorastrap.core.errors import ConfigError

VERSION_PATTERN = r"^\d+(\.\d+)*$"
# The conda platforms lorastrap itself runs on (POSIX file locks and process groups: not native Windows).
RUNS_ON = frozenset({"linux-64", "linux-aarch64", "linux-ppc64le", "osx-64", "osx-arm64"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(Strict):
    source: str = Field(description="where the fact behind this rule comes from")


class BoolRule(Rule):
    value: bool


class VersionRule(Rule):
    value: str = Field(pattern=VERSION_PATTERN)


class IntRule(Rule):
    value: int = Field(ge=0)


class RangeRule(Rule):
    min: str = Field(pattern=VERSION_PATTERN)
    max: str = Field(pattern=VERSION_PATTERN)


class Requirements(Strict):
    gpu: BoolRule | None = Field(None, description="true: needs a usable NVIDIA GPU (a __cuda virtual package)")
    driver_cuda_min: VersionRule | None = Field(None, description="lowest CUDA version the driver must support")
    compute_capability: RangeRule | None = Field(None, description="every GPU's compute capability in [min, max]")
    gpu_memory_min_mib: IntRule | None = Field(None, description="every CUDA device (MIG instance) has this much")
    glibc_min: VersionRule | None = None


class Note(Strict):
    severity: Literal["info", "warning"] = "info"
    message: str
    source: str | None = None


class Profile(Strict):
    description: str
    spec: str = Field(description="environment.yml (conda-lock's format), relative to envs/")
    virtual_packages: str = Field(description="conda-lock virtual-packages file, relative to envs/")
    platforms: list[str] = Field(min_length=1)
    auto: bool = Field(True, description="false: chosen only by name (--profile)")
    priority: int = Field(description="among profiles that fit, the highest priority wins")
    verify: list[str] = Field(min_length=1, description="verification command run with the environment's "
                                                       "python; {verify_script} is scripts/verify_lora.py")
    smoke: list[str] = Field(default_factory=lambda: ["python", "-c", "import sys"],
                             description="quick check run inside a new environment before it is committed")
    requires: Requirements = Requirements()
    notes: list[Note] = []

    @field_validator("platforms")
    @classmethod
    def _known_platforms(cls, value: list[str]) -> list[str]:
        unknown = [p for p in value if p not in RUNS_ON]
        if unknown:
            raise ValueError(f"platform(s) {unknown}: lorastrap itself does not run there (file locks, process "
                             f"groups); it runs on {sorted(RUNS_ON)} (Windows: inside WSL2, as linux-64)")
        return value


class CudaDriver(Strict):
    cuda: str = Field(pattern=r"^\d+$", description="CUDA major version")
    linux: str = Field(pattern=VERSION_PATTERN, description="minimum Linux driver")
    windows: str | None = Field(None, pattern=VERSION_PATTERN)
    source: str


class Advisory(Strict):
    id: str
    compute_capability_below: str = Field(pattern=VERSION_PATTERN)
    severity: Literal["info", "warning"] = "warning"
    message: str
    source: str


class VerifyFacts(Strict):
    """What scripts/verify_lora.py judges by, passed on its command line."""
    int8_fast_path_min_cc: VersionRule = Field(description="lowest compute capability with bitsandbytes' int8 "
                                                           "matmul fast path")
    accelerate_min: VersionRule = Field(description="transformers' gate for 8-bit loading (older transformers do "
                                                    "not say it; the script prefers the installed transformers' own)")
    bitsandbytes_min: VersionRule = Field(description="transformers' gate for bitsandbytes (as above)")


class Matrix(Strict):
    schema_version: Literal[1]
    cuda_drivers: list[CudaDriver]
    advisories: list[Advisory] = []
    verify: VerifyFacts | None = None
    profiles: dict[str, Profile] = Field(min_length=1)

    def names(self) -> list[str]:
        return list(self.profiles)


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-after", "BoolRule", "VersionRule")))


def read_yaml(path: Path, what: str):
    """A data file of envs/ (WHAT names it in the message when it is missing or not YAML)."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", why=f"{what} is missing",
                          fix=f"Pass --envs-dir pointing at a folder with {path.name}, or restore envs/ from git.")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", why=str(getattr(exc, "problem", exc)),
                          fix="Fix the YAML syntax (indentation, quotes, colons).")


def load(envs_dir: Path | None = None) -> Matrix:
    """Load and check envs/profiles.yaml (and that every file it names exists)."""
    envs_dir = envs_dir or paths.ENVS
    path = envs_dir / "profiles.yaml"
    raw = read_yaml(path, "the compatibility matrix")
    try:
        matrix = Matrix.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_path(first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: field '{field}': {first['msg']}{more}",
                          why="profiles.yaml does not match its schema (envs/schemas/profiles.schema.json)",
                          fix="Correct that field; unknown keys are rejected, so check its spelling.")
    for name, profile in matrix.profiles.items():
        for field in ("spec", "virtual_packages"):
            target = envs_dir / getattr(profile, field)
            if not target.is_file():
                raise ConfigError(f"{path}: field 'profiles.{name}.{field}': {target} does not exist",
                                  why=f"profile {name!r} points at a file that is not there",
                                  fix=f"Create {target.name} in {envs_dir} or correct the field.")
    return matrix


def get(matrix: Matrix, name: str) -> Profile:
    if name not in matrix.profiles:
        from lorastrap.core.errors import UsageError
        raise UsageError(f"unknown profile {name!r}", why=f"profiles.yaml defines {', '.join(matrix.profiles)}",
                         fix="Pick one of those (`lorastrap plan` lists them with their requirements).")
    return matrix.profiles[name]


def json_schema() -> dict:
    schema = Matrix.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lorastrap envs/profiles.yaml"
    return schema


def support_table(matrix: Matrix) -> str:
    """The README's support matrix, generated from the data (a test keeps the README in agreement)."""
    rows = ["| profile | chosen | platforms | GPU | driver CUDA | compute capability | GPU memory |",
            "|---|---|---|---|---|---|---|"]
    for name, p in sorted(matrix.profiles.items(), key=lambda kv: -kv[1].priority):
        r = p.requires
        rows.append("| " + " | ".join([
            f"`{name}`",
            "automatically" if p.auto else "by name only",
            ", ".join(p.platforms),
            "required" if r.gpu and r.gpu.value else "not needed",
            f">= {r.driver_cuda_min.value}" if r.driver_cuda_min else "-",
            f"{r.compute_capability.min} – {r.compute_capability.max}" if r.compute_capability else "-",
            f">= {r.gpu_memory_min_mib.value} MiB" if r.gpu_memory_min_mib else "-",
        ]) + " |")
    return "\n".join(rows)
