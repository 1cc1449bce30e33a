"""Explain an error message: match it against the table of known failures (envs/known-errors.yaml) and, given an
environment, say which of the failure's causes applies there — only that one — with its fix and public source.

The table is data: each entry has the signatures (regular expressions) of the text users see, and its causes, each
with the conditions under which it applies (package versions, torch's CUDA build, a usable GPU, the platform,
compute capability, a verification pre-check that fails), the why, the fix and the source that established it.
An environment is judged by its description (``Facts``): built from doctor's run of the verification pre-checks,
or read from a file (``lorastrap explain --facts``: a description recorded on another machine).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorastrap.care import doctor
from lorastrap.core import fsutil, paths
from lorastrap.matrix import profiles
from lorastrap.machine.detect import Machine
from lorastrap.core.errors import ConfigError, UsageError

TABLE = "known-errors.yaml"
FACTS_LIMIT = 1 << 20  # an environment description is a few KiB
TEXT_KEEP = 8 << 20  # the last 8 MiB of a log: where its error is
STDIN_LIMIT = 1 << 30  # more on stdin does not end (/dev/zero) or is no single run's log
ABSENT, PRESENT = "absent", "present"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class When(Strict):
    """The conditions under which a cause applies; all that are given must hold (none given: always)."""
    packages: dict[str, str] = Field({}, description="distribution → 'absent', 'present', or a PEP 440 specifier "
                                                     "its installed version must satisfy (e.g. '<0.46')")
    torch_cuda_build: bool | None = Field(None, description="torch was built with CUDA (torch.version.cuda)")
    cuda_available: bool | None = Field(None, description="torch can use a CUDA GPU here")
    gpu: bool | None = Field(None, description="the machine has an NVIDIA GPU (detect, or torch's devices)")
    compute_capability_below: str | None = Field(None, pattern=r"^\d+\.\d+$",
                                                 description="some GPU has a lower compute capability")
    bnb_native_library: bool | None = Field(None, description="bitsandbytes loaded a native library")
    os: list[str] = Field([], description="one of these sys.platform values (linux, darwin, win32)")
    check_fails: list[str] = Field([], description="these verification pre-checks fail (by name)")

    @field_validator("packages")
    @classmethod
    def _specifiers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, spec in value.items():
            if spec not in (ABSENT, PRESENT):
                try:
                    SpecifierSet(spec)
                except InvalidSpecifier:
                    raise ValueError(f"{name}: {spec!r} is not 'absent', 'present' or a version specifier")
        return {canonicalize_name(k): v for k, v in value.items()}


class Cause(Strict):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    when: When = When()
    why: str
    fix: str
    source: str = Field(description="the public issue, release note or code that established this cause")


class KnownError(Strict):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    title: str
    signatures: list[str] = Field(min_length=1, description="regular expressions searched in the pasted text")
    causes: list[Cause] = Field(min_length=1, description="most specific first: the first that applies is said")
    source: str = Field(description="where the message comes from (the project's code or tracker)")

    @field_validator("signatures")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for sig in value:
            try:
                re.compile(sig)
            except re.error as exc:
                raise ValueError(f"signature {sig!r} is not a valid regular expression: {exc}")
        return value


class Table(Strict):
    schema_version: int = Field(ge=1, le=1)
    errors: list[KnownError] = Field(min_length=1)


class Gpu(Strict):
    name: str | None = None
    compute_capability: str | None = None


class Facts(BaseModel):
    """What explain judges an environment by (an environment description)."""
    model_config = ConfigDict(extra="forbid")
    source: str | None = Field(None, description="where this description comes from (a machine, a public report)")
    python: str | None = None
    os: str | None = Field(None, description="sys.platform of the environment's Python")
    packages: dict[str, str] = Field({}, description="distribution (normalized name) → installed version")
    torch_cuda_build: str | None = None
    cuda_available: bool = False
    gpus: list[Gpu] = []
    bnb_native_library: str | None = None
    checks_failed: list[str] = []


def json_schema() -> dict:
    schema = Table.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lorastrap envs/known-errors.yaml"
    return schema


def load(envs_dir: Path | None = None) -> Table:
    path = (envs_dir or paths.ENVS) / TABLE
    raw = profiles.read_yaml(path, "the table of known failures")
    try:
        return Table.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: field '{where}': {first['msg']}",
                          why="known-errors.yaml does not match its schema (envs/schemas/known-errors.schema.json)",
                          fix="Correct that field; unknown keys are rejected, so check its spelling.")


# --------------------------------------------------------------------------------------------------------------
# An environment's description

def facts_from(report: dict, machine: Machine | None = None, source: str | None = None) -> Facts:
    """The description of an environment from its pre-checks' report (scripts/verify_lora.py) and the machine."""
    torch = report.get("torch") or {}
    gpus = [Gpu(name=d.get("name"), compute_capability=d.get("compute_capability"))
            for d in torch.get("devices", []) if isinstance(d, dict)]
    if not gpus and machine is not None:
        gpus = [Gpu(name=g.name, compute_capability=g.compute_capability) for g in machine.nvidia.gpus]
    packages = dict(report.get("distributions") or {})
    for name, version in (report.get("versions") or {}).items():  # what the import found, when it could
        if version:
            packages[canonicalize_name(name)] = version
    platform = str(report.get("platform") or "")
    return Facts(source=source, python=report.get("python"),
                 os="linux" if platform.startswith("Linux") else "darwin" if platform.startswith("macOS")
                 else "win32" if platform.startswith("Windows") else platform or None,
                 packages=packages, torch_cuda_build=torch.get("cuda_build"),
                 cuda_available=bool(torch.get("cuda_available")), gpus=gpus,
                 bnb_native_library=(report.get("bitsandbytes") or {}).get("native_library"),
                 checks_failed=[c["name"] for c in report.get("checks", []) if c.get("status") == "fail"])


def read_facts(path: Path) -> Facts:
    fix = "Pass the `environment` object of `lorastrap explain --json` run on that machine."
    text = fsutil.read_bounded(path, limit=FACTS_LIMIT, what="--facts", fix=fix)
    try:
        return Facts.model_validate_json(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not an environment description", why=str(exc).splitlines()[0],
                         fix="Pass the `environment` object of `lorastrap explain --json` run on that machine.")


def _version(text: str) -> Version | None:
    try:
        return Version(text.split("+")[0])
    except InvalidVersion:
        return None


def reasons(when: When, facts: Facts) -> list[str] | None:
    """Why the conditions hold in FACTS (one line each), or None when one does not."""
    out = []
    for name, spec in when.packages.items():
        have = facts.packages.get(name)
        if spec == ABSENT:
            if have is not None:
                return None
            out.append(f"{name} is not installed")
        elif have is None:
            return None
        elif spec == PRESENT:
            out.append(f"{name} {have} is installed")
        else:
            v = _version(have)
            if v is None or not SpecifierSet(spec, prereleases=True).contains(v):
                return None
            out.append(f"{name} {have} ({spec})")
    gpu_here = bool(facts.gpus) or facts.cuda_available
    for value, have, yes, no in (
            (when.torch_cuda_build, bool(facts.torch_cuda_build), f"torch is built for CUDA {facts.torch_cuda_build}",
             "torch is a CPU-only build"),
            (when.cuda_available, facts.cuda_available, "torch can use a CUDA GPU", "torch cannot use a CUDA GPU"),
            (when.gpu, gpu_here, "this machine has an NVIDIA GPU", "this machine has no NVIDIA GPU"),
            (when.bnb_native_library, bool(facts.bnb_native_library),
             f"bitsandbytes loaded {facts.bnb_native_library}", "bitsandbytes loaded no native library")):
        if value is not None:
            if value != have:
                return None
            out.append(yes if have else no)
    if when.compute_capability_below:
        limit = _version(when.compute_capability_below)
        low = [g for g in facts.gpus if (cc := _version(g.compute_capability or "")) is not None and cc < limit]
        if not low:
            return None
        out.append(f"{low[0].name or 'a GPU'} has compute capability {low[0].compute_capability} "
                   f"< {when.compute_capability_below}")
    if when.os:
        if facts.os not in when.os:
            return None
        out.append(f"the platform is {facts.os}")
    for check in when.check_fails:
        if check not in facts.checks_failed:
            return None
        out.append(f"the pre-check '{check}' fails")
    return out


# --------------------------------------------------------------------------------------------------------------
# Explaining

def matches(text: str, table: Table) -> list[KnownError]:
    return [e for e in table.errors if any(re.search(sig, text) for sig in e.signatures)]


def explain(text: str, *, table: Table, facts: Facts | None = None) -> dict:
    """The known failures TEXT shows and, with FACTS, the one cause of each that applies in that environment."""
    if not text.strip():
        raise UsageError("no error text to explain", fix="Pass the message, a log file, or pipe it in: "
                         "`python train.py 2>&1 | lorastrap explain -`.")
    found = []
    for entry in matches(text, table):
        item = {"id": entry.id, "title": entry.title, "source": entry.source, "cause": None, "causes": []}
        for cause in entry.causes:
            doc = {"id": cause.id, "why": cause.why, "fix": cause.fix, "source": cause.source}
            if facts is None:
                item["causes"].append(doc)
                continue
            because = reasons(cause.when, facts)
            if because is not None:
                item["cause"] = {**doc, "because": because}
                break
        if facts is not None and item["cause"] is None:
            item["causes"] = [{"id": c.id, "why": c.why, "fix": c.fix, "source": c.source} for c in entry.causes]
        found.append(item)
    return {"known": bool(found), "errors": found}


def explain_in(text: str, *, prefix: Path | None, python: Path | None, envs_dir: Path,
               machine: Machine) -> tuple[dict, doctor.Diagnosis]:
    """explain() judged in an environment that doctor diagnoses (its findings come along: for an unknown error they
    are what is left to say)."""
    table = load(envs_dir)
    diag = doctor.diagnose(prefix, python=python, envs_dir=envs_dir, machine=machine)
    facts = facts_from(diag.report, machine, source=f"doctor on {diag.prefix}") if diag.report else None
    result = explain(text, table=table, facts=facts)
    result.update(environment=facts.model_dump() if facts else None, doctor=diag.to_dict())
    return result, diag


def format_explanation(result: dict, diag: doctor.Diagnosis | None = None) -> str:
    lines = []
    for e in result["errors"]:
        lines.append(f"known failure: {e['title']}  [{e['id']}]")
        if e["cause"]:
            c = e["cause"]
            lines += [f"  the cause here: {c['why']}", f"    because: {'; '.join(c['because'])}",
                      f"    fix: {c['fix']}", f"    source: {c['source']}"]
        else:
            lines.append("  its known causes (" + ("none applies to this environment as described"
                                                  if result.get("environment") else
                                                  "pass --prefix or --python to learn which applies") + "):")
            for c in e["causes"]:
                lines += [f"  - {c['why']}", f"      fix: {c['fix']}", f"      source: {c['source']}"]
    if not result["known"]:
        lines.append("unknown error: it matches nothing in lorastrap's table of known failures "
                     "(envs/known-errors.yaml)" + ("; doctor's findings on the environment follow" if diag else
                                                   "; pass --prefix or --python to run doctor's checks"))
        if diag:
            lines.append(doctor.format_diagnosis(diag))
    return "\n".join(lines)


def read_text(source: str | None, stdin) -> str:
    """The error text: SOURCE is '-' (stdin), a file (e.g. a training log), or the message itself."""
    if source is None or source == "-":
        if source is None and stdin.isatty():
            raise UsageError("no error text to explain", fix="Pass the message, a log file, or pipe it in: "
                             "`python train.py 2>&1 | lorastrap explain -`.")
        return fsutil.read_stream_tail(stdin, keep=TEXT_KEEP, limit=STDIN_LIMIT, what="explain -",
                                       fix="Pipe in the log of one run (its last part is what counts).")
    path = Path(source)
    if "\n" not in source and len(source) < 4096 and path.is_file():
        try:
            with open(path, "rb") as f:  # a long training log: its end holds the error
                f.seek(max(0, os.fstat(f.fileno()).st_size - TEXT_KEEP))
                return f.read(TEXT_KEEP).decode("utf-8", errors="replace")
        except OSError as exc:
            raise UsageError(f"cannot read {path}", why=str(exc), fix="Pass a readable file, or the text itself.")
    return source
