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


CC_PATTERN = r"^\d+\.\d+$"


class CodeRule(Rule):
    """The GPU code one component of a build carries, as its build script or its own binary says.

    A GPU of compute capability X.z runs it when the component has a cubin for X.y with y <= z (binary
    compatibility within a major version) or PTX for a compute capability <= X.z (compiled by the driver at load
    time).  Source of those two rules: CUDA C++ Programming Guide, "Binary Compatibility" / "PTX Compatibility".
    """
    component: str = Field(description="what carries the code, e.g. 'pytorch 2.13 cuda130 (linux-64)'")
    cubins: list[str] = Field(min_length=1, description="compute capabilities with real code (sm_XY), 'X.Y'")
    ptx: list[str] = Field([], description="compute capabilities with PTX (compute_XY), 'X.Y'")

    @field_validator("cubins", "ptx")
    @classmethod
    def _ccs(cls, value: list[str]) -> list[str]:
        import re
        bad = [v for v in value if not re.match(CC_PATTERN, v)]
        if bad:
            raise ValueError(f"{bad}: a compute capability is MAJOR.MINOR, e.g. 8.0")
        return value

    def runs_on(self, cc: str) -> str | None:
        """How a GPU of compute capability cc runs this component ('sm_90', 'PTX compute_120'), or None."""
        major, minor = (int(p) for p in cc.split(".")[:2])
        cubins = [c for c in self.cubins if int(c.split(".")[0]) == major and int(c.split(".")[1]) <= minor]
        if cubins:
            best = max(cubins, key=lambda c: int(c.split(".")[1]))
            return "sm_" + best.replace(".", "")
        ptx = [c for c in self.ptx if tuple(int(p) for p in c.split(".")) <= (major, minor)]
        if ptx:
            return "PTX compute_" + max(ptx, key=lambda c: tuple(int(p) for p in c.split("."))).replace(".", "")
        return None

    def summary(self) -> str:
        """'sm_75 … sm_120, PTX compute_120' as a short list."""
        text = " ".join("sm_" + c.replace(".", "") for c in self.cubins)
        return text + (", PTX " + " ".join("compute_" + c.replace(".", "") for c in self.ptx) if self.ptx else "")


class Requirements(Strict):
    gpu: BoolRule | None = Field(None, description="true: needs a usable NVIDIA GPU (a __cuda virtual package)")
    driver_cuda_min: VersionRule | None = Field(None, description="lowest CUDA version the driver must support")
    compute_capability: RangeRule | None = Field(None, description="every GPU's compute capability in [min, max]")
    cuda_code: list[CodeRule] | None = Field(None, description="every GPU runs the code of every component listed "
                                                                "(a cubin of its major version, or PTX below it)")
    jetson: BoolRule | None = Field(None, description="false: not for Jetson (Tegra) boards; true: only for them")
    jetson_l4t_min: VersionRule | None = Field(None, description="a Jetson board needs at least this Jetson Linux "
                                                                 "(L4T) release")
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
    preferred: str | None = Field(None, description="why it ranks where it does against the profiles that fit the "
                                                    "same machines (said when it is chosen over one of them)")
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


def code_coverage(rules: list[CodeRule], last_major: int = 15) -> str:
    """The compute capabilities every component runs on, as ranges: '7.5 – 10.9, 12.0 – 12.9' ('12.0+' when PTX
    leaves it open-ended)."""
    grid = [f"{major}.{minor}" for major in range(1, last_major + 1) for minor in range(10)]
    ok = [all(r.runs_on(cc) for r in rules) for cc in grid]
    ranges, start = [], None
    for i, good in enumerate(ok + [False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            ranges.append(f"{grid[start]}+" if i == len(grid) else f"{grid[start]} – {grid[i - 1]}")
            start = None
    return ", ".join(ranges) or "none"


def _cc_column(r: Requirements) -> str:
    if r.cuda_code:
        return code_coverage(r.cuda_code)
    if r.compute_capability:
        return f"{r.compute_capability.min} – {r.compute_capability.max}"
    return "-"


def _jetson_column(r: Requirements) -> str:
    if r.jetson is not None and not r.jetson.value:
        return "no"
    if r.jetson_l4t_min is not None:
        return f"L4T >= {r.jetson_l4t_min.value}"
    return "-"


def support_table(matrix: Matrix) -> str:
    """The README's support matrix, generated from the data (a test keeps the README in agreement)."""
    rows = ["| profile | chosen | platforms | GPU | driver CUDA | compute capability | Jetson | glibc | GPU memory |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, p in sorted(matrix.profiles.items(), key=lambda kv: (kv[1].platforms[0], -kv[1].priority)):
        r = p.requires
        rows.append("| " + " | ".join([
            f"`{name}`",
            f"automatically (priority {p.priority})" if p.auto else "by name only",
            ", ".join(p.platforms),
            "required" if r.gpu and r.gpu.value else "not needed",
            f">= {r.driver_cuda_min.value}" if r.driver_cuda_min else "-",
            _cc_column(r),
            _jetson_column(r),
            f">= {r.glibc_min.value}" if r.glibc_min else "-",
            f">= {r.gpu_memory_min_mib.value} MiB" if r.gpu_memory_min_mib else "-",
        ]) + " |")
    rows.append("")
    rows.append("What each row rests on (the `source` of each rule in `envs/profiles.yaml`):")
    rows.append("")
    for name, p in sorted(matrix.profiles.items(), key=lambda kv: (kv[1].platforms[0], -kv[1].priority)):
        r = p.requires
        facts = []
        for field in ("driver_cuda_min", "compute_capability", "jetson", "jetson_l4t_min", "glibc_min"):
            rule = getattr(r, field)
            if rule is not None:
                facts.append(f"{field}: {' '.join(rule.source.split())}")
        for code in r.cuda_code or []:
            facts.append(f"code of {code.component} ({code.summary()}): {' '.join(code.source.split())}")
        if facts:
            rows.append(f"- `{name}`: " + "; ".join(facts))
    return "\n".join(rows)
