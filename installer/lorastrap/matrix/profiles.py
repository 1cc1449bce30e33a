"""The compatibility matrix: envs/profiles.yaml loaded into strict plain records (core/plain.py: unknown keys are
rejected), checked once per version of the file: what the check found is kept in the data dir's checked/, so an
install reads the matrix without parsing YAML or importing pydantic.

The JSON schema of the file is committed as envs/schemas/profiles.schema.json; tests regenerate and compare it.
Every rule carries its source.  Errors name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from lorastrap.core import kept, paths, yamlio
from lorastrap.core.errors import ConfigError, LorastrapError
from lorastrap.core.plain import Checked, Field, Plain, frozen_record as record

VERSION_PATTERN = r"^\d+(\.\d+)*$"
# The conda platforms lorastrap itself runs on (POSIX file locks and process groups: not native Windows).
RUNS_ON = frozenset({"linux-64", "linux-aarch64", "linux-ppc64le", "osx-64", "osx-arm64"})
CC_PATTERN = r"^\d+\.\d+$"


def _compute_capabilities(value: list[str]) -> list[str]:
    import re
    bad = [v for v in value if not re.match(CC_PATTERN, v)]
    if bad:
        raise ValueError(f"{bad}: a compute capability is MAJOR.MINOR, e.g. 8.0")
    return value


def _known_platforms(value: list[str]) -> list[str]:
    unknown = [p for p in value if p not in RUNS_ON]
    if unknown:
        raise ValueError(f"platform(s) {unknown}: lorastrap itself does not run there (file locks, process "
                         f"groups); it runs on {sorted(RUNS_ON)} (Windows: inside WSL2, as linux-64)")
    return value


@record
class Rule(Plain):
    source: str = Field(description="where the fact behind this rule comes from")


@record
class BoolRule(Rule):
    value: bool


@record
class VersionRule(Rule):
    value: Annotated[str, Checked(pattern=VERSION_PATTERN)]


@record
class IntRule(Rule):
    value: Annotated[int, Checked(ge=0)]


@record
class RangeRule(Rule):
    min: Annotated[str, Checked(pattern=VERSION_PATTERN)]
    max: Annotated[str, Checked(pattern=VERSION_PATTERN)]


@record
class CodeRule(Rule):
    """The GPU code one component of a build carries, as its build script or its own binary says.

    A GPU of compute capability X.z runs it when the component has a cubin for X.y with y <= z (binary
    compatibility within a major version) or PTX for a compute capability <= X.z (compiled by the driver at load
    time).  Source of those two rules: CUDA C++ Programming Guide, "Binary Compatibility" / "PTX Compatibility".
    """
    component: str = Field(description="what carries the code, e.g. 'pytorch 2.13 cuda130 (linux-64)'")
    cubins: Annotated[list[str], Checked(min_length=1, after=_compute_capabilities)] = Field(
        description="compute capabilities with real code (sm_XY), 'X.Y'")
    ptx: Annotated[list[str], Checked(after=_compute_capabilities)] = Field(
        default_factory=list, description="compute capabilities with PTX (compute_XY), 'X.Y'")

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


@record
class Requirements(Plain):
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


@record
class Note(Plain):
    severity: Literal["info", "warning"] = "info"
    message: str
    source: str | None = None


def _smoke() -> list[str]:
    return ["python", "-c", "import sys"]


@record
class Profile(Plain):
    description: str
    spec: str = Field(description="environment.yml (conda-lock's format), relative to envs/")
    virtual_packages: str = Field(description="conda-lock virtual-packages file, relative to envs/")
    platforms: Annotated[list[str], Checked(min_length=1, after=_known_platforms)]
    auto: bool = Field(True, description="false: chosen only by name (--profile)")
    priority: int = Field(description="among profiles that fit, the highest priority wins")
    verify: Annotated[list[str], Checked(min_length=1)] = Field(
        description="verification command run with the environment's python; {verify_script} is "
                    "scripts/verify_lora.py")
    smoke: list[str] = Field(default_factory=_smoke,
                             description="quick check run inside a new environment before it is committed")
    requires: Requirements = Field(default_factory=Requirements)
    preferred: str | None = Field(None, description="why it ranks where it does against the profiles that fit the "
                                                    "same machines (said when it is chosen over one of them)")
    notes: list[Note] = Field(default_factory=list)


@record
class CudaDriver(Plain):
    cuda: Annotated[str, Checked(pattern=r"^\d+$")] = Field(description="CUDA major version")
    linux: Annotated[str, Checked(pattern=VERSION_PATTERN)] = Field(description="minimum Linux driver")
    windows: Annotated[str, Checked(pattern=VERSION_PATTERN)] | None = None
    source: str


@record
class Advisory(Plain):
    id: str
    compute_capability_below: Annotated[str, Checked(pattern=VERSION_PATTERN)]
    severity: Literal["info", "warning"] = "warning"
    message: str
    source: str


@record
class VerifyFacts(Plain):
    """What scripts/verify_lora.py judges by, passed on its command line."""
    int8_fast_path_min_cc: VersionRule = Field(description="lowest compute capability with bitsandbytes' int8 "
                                                           "matmul fast path")
    accelerate_min: VersionRule = Field(description="transformers' gate for 8-bit loading (older transformers do "
                                                    "not say it; the script prefers the installed transformers' own)")
    bitsandbytes_min: VersionRule = Field(description="transformers' gate for bitsandbytes (as above)")


@record
class Matrix(Plain):
    schema_version: Literal[1]
    cuda_drivers: list[CudaDriver]
    advisories: list[Advisory] = Field(default_factory=list)
    verify: VerifyFacts | None = None
    profiles: Annotated[dict[str, Profile], Checked(min_length=1)]

    def names(self) -> list[str]:
        return list(self.profiles)


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-after", "BoolRule", "VersionRule")))


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", why=f"{what} is missing",
                          fix=f"Pass --envs-dir pointing at a folder with {path.name}, or restore envs/ from git.")


def _parse_yaml(path: Path, data: bytes):
    import yaml
    try:
        return yamlio.load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", why=str(getattr(exc, "problem", exc)),
                          fix="Fix the YAML syntax (indentation, quotes, colons).")


def read_yaml(path: Path, what: str):
    """A data file of envs/ (WHAT names it in the message when it is missing or not YAML)."""
    return _parse_yaml(path, _read_bytes(path, what))


def _validate(path: Path, raw) -> Matrix:
    try:
        return Matrix.model_validate(raw)
    except ValueError as exc:
        if not hasattr(exc, "errors"):
            raise
        first = exc.errors()[0]  # pydantic's ValidationError
        field = _field_path(first["loc"]) or "(top level)"
        # A record is a dataclass: pydantic calls an unknown key an unexpected keyword argument.
        message = "Extra inputs are not permitted" if first["type"] == "unexpected_keyword_argument" else first["msg"]
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: field '{field}': {message}{more}",
                          why="profiles.yaml does not match its schema (envs/schemas/profiles.schema.json)",
                          fix="Correct that field; unknown keys are rejected, so check its spelling.")


# The matrix a check found valid is kept in the data dir, by a key over the file's bytes and the code that checks
# it, so that the next read of the same file (every install reads it) neither parses nor checks it again.
CHECKED_KEEP = 32  # entries kept (the newest): one per profiles.yaml version and lorastrap release


def _checked_key(data: bytes) -> str:
    import hashlib
    import os

    from lorastrap import __version__
    from lorastrap.core import plain
    code = []
    for source in (__file__, plain.__file__):  # a checkout's edits change the key too (the version stays)
        try:
            st = os.stat(source)
            code.append((st.st_mtime_ns, st.st_size))
        except OSError:
            code.append(None)
    return hashlib.sha256(f"{__version__} {code} {hashlib.sha256(data).hexdigest()}".encode()).hexdigest()


def _read_checked(key: str) -> Matrix | None:
    """The matrix kept under KEY, or None (none, or one that cannot be read, or not what was written)."""
    raw = kept.recall(f"profiles.{key[:32]}", key, "matrix")
    try:
        return Matrix.model_validate_plain(raw) if raw is not None else None
    except (ValueError, KeyError, TypeError, AttributeError, LorastrapError):
        return None


def _keep_checked(key: str, matrix: Matrix) -> None:
    """Keep MATRIX under KEY (never failing: without it the next run checks the file again)."""
    kept.keep(f"profiles.{key[:32]}", key, "matrix", matrix.model_dump(), exact=False,
              newest=("profiles.*.json", CHECKED_KEEP))


def load(envs_dir: Path | None = None, *, keep: bool = False) -> Matrix:
    """Load and check envs/profiles.yaml (and that every file it names exists); a file checked before is read
    from what that check kept.  keep: keep what this check found (the commands that change things ask for it; a
    read-only command such as `plan` or a dry run writes nothing)."""
    envs_dir = envs_dir or paths.ENVS
    path = envs_dir / "profiles.yaml"
    data = _read_bytes(path, "the compatibility matrix")
    key = _checked_key(data)
    matrix = _read_checked(key)
    if matrix is None:
        matrix = _validate(path, _parse_yaml(path, data))
        if keep:
            _keep_checked(key, matrix)
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
