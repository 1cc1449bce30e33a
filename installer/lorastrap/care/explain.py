"""Explain an error message: match it against the table of known failures (envs/known-errors.yaml) and say which of
the failure's causes applies — only that one — with its fix and public source.

The table is data: each entry has the signatures (regular expressions) of the text users see, and its causes, each
with the conditions under which it applies (package versions, torch's CUDA build, a usable GPU, the platform,
compute capability, what the pasted text itself shows, a verification pre-check that fails), the why, the fix and
the source that established it.

What decides the cause, in this order:
- the pasted text: what it shows is evidence (``Evidence``: Windows or macOS paths, versions and bitsandbytes'
  pre-0.43 CUDA-setup lines, torch's +cpu/+cuXXX build, GPU names and sm_XX numbers, torch's "supports CUDA
  capabilities" list, ...). Causes the evidence rules out are dropped; one that it fully supports is said;
- the environment, when there is one: its description (``Facts``), built from doctor's run of the verification
  pre-checks (``--prefix``, ``--python``, or the active environment ``lorastrap explain`` finds), or read from a
  file (``--facts``). It is complete (a package it does not list is absent), so the first cause whose conditions
  all hold there is said;
- without either deciding, the causes left, most likely first, and the one command (the entry's ``ask``) whose
  output tells them apart.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import field
from pathlib import Path
from typing import Literal, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorastrap.care import doctor
from lorastrap.core import fsutil, paths
from lorastrap.install import prefix as pfx
from lorastrap.matrix import profiles
from lorastrap.machine.model import Machine
from lorastrap.core.errors import ConfigError, UsageError
from lorastrap.core.plain import Struct, struct

TABLE = "known-errors.yaml"
FACTS_LIMIT = 1 << 20  # an environment description is a few KiB
TEXT_KEEP = 8 << 20  # the last 8 MiB of a log: where its error is
STDIN_LIMIT = 1 << 30  # more on stdin does not end (/dev/zero) or is no single run's log
ABSENT, PRESENT = "absent", "present"


def _regexes(value: list[str]) -> list[str]:
    for sig in value:
        try:
            re.compile(sig)
        except re.error as exc:
            raise ValueError(f"{sig!r} is not a valid regular expression: {exc}")
    return value


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
    gpu_vs_build: Literal["newer", "older"] | None = Field(
        None, description="the GPU's architecture is newer (older) than every one the torch build has kernels for, "
                          "as torch's own warning says")
    bnb_native_library: bool | None = Field(None, description="bitsandbytes loaded a native library")
    os: list[str] = Field([], description="one of these sys.platform values (linux, darwin, win32)")
    text: list[str] = Field([], description="regular expressions: the pasted text shows one of them (their absence "
                                            "rules nothing out)")
    text_not: list[str] = Field([], description="regular expressions: the pasted text shows none of them")
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

    _text = field_validator("text", "text_not")(classmethod(lambda cls, v: _regexes(v)))


class Cause(Strict):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    when: When = When()
    why: str
    fix: str
    source: str = Field(description="the public issue, release note or code that established this cause")


class KnownError(Strict):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    title: str
    signatures: list[str] = Field(min_length=1, description="regular expressions searched in the pasted text (as "
                                                            "pasted, and with boxes, line breaks and prefixes gone)")
    unless: list[str] = Field([], description="regular expressions: when the text shows one, another entry "
                                              "explains it better and this one is not said")
    causes: list[Cause] = Field(min_length=1, description="most specific first: with an environment, the first that "
                                                          "applies is said")
    ask: str | None = Field(None, description="the command whose output tells the causes apart (said when neither "
                                              "the text nor an environment decides)")
    likely_first: list[str] = Field([], description="cause ids to list first when neither the text nor an "
                                                    "environment tells (the causes public reports establish most "
                                                    "often); then the table's order")
    source: str = Field(description="where the message comes from (the project's code or tracker)")

    _sigs = field_validator("signatures", "unless")(classmethod(lambda cls, v: _regexes(v)))

    @model_validator(mode="after")
    def _likely_first_are_causes(self) -> "KnownError":
        unknown = set(self.likely_first) - {c.id for c in self.causes}
        if unknown:
            raise ValueError(f"likely_first names {sorted(unknown)}, which are not causes of {self.id}")
        return self


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


# --------------------------------------------------------------------------------------------------------------
# What the pasted text shows

_BOX = re.compile(r"[│┃┆┊╭╮╰╯─━❱▶]")
_PREFIXES = re.compile(r"(?m)^[ \t]*(?:\[rank\d+\]:[ \t]?|[\w.-]+_\d+[ \t]+\|[ \t]|>[ \t])")


def flatten(text: str) -> str:
    """TEXT with what reformatting adds taken away: rich-traceback boxes, log prefixes ([rank0]:, docker compose's
    `service_1 |`, quoting), Windows path separators (as /) and line breaks (one space)."""
    text = _PREFIXES.sub("", text.replace("\r\n", "\n"))
    text = _BOX.sub(" ", text).replace("\\\\", "/").replace("\\", "/")
    return re.sub(r"\s+", " ", text)


def _search(pattern: str, text: str, flat: str) -> re.Match | None:
    return re.search(pattern, text) or re.search(pattern, flat)


@struct
class Evidence(Struct):
    """What the text shows about the environment that produced it (None: it does not say)."""
    os: str | None = None
    packages: dict[str, tuple[str, Version]] = field(default_factory=dict)  # name → ("==" | "<", version)
    torch_cuda_build: str | None = None  # "" = a CPU-only build
    cuda_available: bool | None = None
    gpu: bool | None = None
    compute_capability: Version | None = None
    gpu_vs_build: str | None = None
    said: dict[str, str] = field(default_factory=dict)  # what was read, and from what, for "because"


_WINDOWS = (r"\b[A-Za-z]:\\{1,2}[\w .$-]", r"WindowsPath\(", r"\[WinError \d+\]", r"\.dll\b",
            r"\\(?:Lib|site-packages|AppData|Roaming|Scripts)\\", r"win_amd64")
_MACOS = (r"/Users/[\w.-]+/", r"/opt/homebrew/", r"\bDevice: mps\b", r"\bmacOS\b", r"\bMac ?Book\b",
          r"(?i)\bm[1-4] (?:max|pro|ultra)\b", r"\bApple M[1-4]\b")
_LINUX = (r"/home/[\w.-]+/", r"/usr/local/lib/python", r"/opt/conda/", r"dist-packages", r"/root/", r"\bWSL\b",
          r"\bUbuntu\b", r"\bCentOS\b", r"/lib64?/[\w-]*/?libc\.so", r"\w/[\w.-]+\.so\b")
# bitsandbytes' CUDA setup of 0.35-0.42 (cuda_setup/main.py, CUDALibrary_Singleton, the cadam32bit_grad_fp32 probe in
# cextension.py): gone in 0.43.0, which takes the CUDA version from torch
_BNB_BEFORE_043 = (r"bitsandbytes[/\\]+cuda_setup", r"CUDA[ _]SETUP:", r"CUDA_SETUP:", r"CUDALibrary_Singleton",
                   r"CUDASetup\.get_instance", r"cadam32bit_grad_fp32",
                   r"CUDA Setup failed despite GPU being available",
                   r"_nocublaslt\.(?:so|dll)")
_PKG_NAMES = {"bitsandbytes": r"bitsandbytes", "transformers": r"transformers", "peft": r"peft",
              "accelerate": r"accelerate", "torch": r"(?:py)?torch", "triton": r"triton", "numpy": r"numpy",
              "setuptools": r"setuptools", "huggingface-hub": r"huggingface[-_]hub", "scipy": r"scipy"}
_VERSION = r"v?(\d+\.\d+(?:\.\d+)?(?:\.post\d+|\.dev\d+|rc\d+)?)(\+[\w.]+)?"
# NVIDIA's compute capability by GPU name (https://developer.nvidia.com/cuda-gpus)
_GPU_CC = ((r"\bRTX ?50\d0\b|\bB200\b|\bRTX PRO 6000\b", "12.0"), (r"\b[HG]H?[12]00\b|\bH[28]00\b|\bH20\b", "9.0"),
           (r"\bRTX ?40\d0\b|\bL40S?\b|\bL4\b", "8.9"), (r"\bAGX Orin\b|\bJetson Orin\b", "8.7"),
           (r"\bRTX ?30\d0\b|\bA(?:10G?|40|[2-6]000)\b", "8.6"), (r"\bA(?:100|800|30)\b", "8.0"),
           (r"\bT4\b|\bRTX ?20\d0\b|\bGTX ?16\d0\b", "7.5"), (r"\bV100\b|\bTITAN V\b", "7.0"),
           (r"\bGTX ?10\d0\b|\bP40\b", "6.1"), (r"\bP100\b", "6.0"), (r"\bK80\b", "3.7"))
_NVIDIA_GPU = (r"\b(?:RTX|GTX) ?\d{3,4}\b", r"\bNVIDIA-SMI \d", r"\bTesla [A-Z]\d",
               r"\b[AHL]\d{2,3}[A-Z]?\b(?=[- ,.)]|$)",
               r"\bT4\b", r"\bV100\b", r"\bJetson\b", r"with CUDA capability sm_\d+", r"Found GPU\d",
               r"compute capability among GPUs detected", r"\bDevice: cuda:\d", r"\bNVIDIA GeForce\b")
_NO_NVIDIA_GPU = (r"(?i)(?<!compiled )\bwithout (?:a |an )?(?:nvidia )?gpu\b(?! support)",
                  r"(?i)\bintegrated intel gpu\b", r"(?i)\biris xe\b",
                  r"(?i)\bno (?:nvidia )?gpu (?:on|in) (?:this|my)\b")


def _sm(text: str) -> Version:
    return Version(f"{text[:-1]}.{text[-1]}")


def read_evidence(text: str) -> Evidence:
    """What TEXT (a traceback, a log, a paste) shows about the environment that produced it."""
    flat = flatten(text)
    ev = Evidence()
    for os_name, patterns in (("win32", _WINDOWS), ("darwin", _MACOS), ("linux", _LINUX)):
        m = next((m for p in patterns if (m := re.search(p, text))), None)
        if m:
            ev.os, ev.said["os"] = os_name, f"the text shows {_os_word(os_name)} ('{_around(text, m)}')"
            break
    for name, pattern in _PKG_NAMES.items():
        m = re.search(rf"(?<![\w.-])(?i:{pattern})(?![\w-])(?:\s*(?:==|:|-| - )\s*|\s+(?:version:?\s*)?){_VERSION}",
                      flat)
        if m and _version(m.group(1)):
            ev.packages[name] = ("==", Version(m.group(1)))
            ev.said[f"pkg:{name}"] = f"the text names {name} {m.group(1)}{m.group(2) or ''}"
            if name == "torch" and m.group(2):
                build = m.group(2)[1:]
                if build == "cpu":
                    ev.torch_cuda_build = ""
                elif re.fullmatch(r"cu\d{3}", build):
                    ev.torch_cuda_build = f"{build[2:-1]}.{build[-1]}"
    if "bitsandbytes" not in ev.packages:
        m = next((m for p in _BNB_BEFORE_043 if (m := _search(p, text, flat))), None)
        if m:
            ev.packages["bitsandbytes"] = ("<", Version("0.43"))
            ev.said["pkg:bitsandbytes"] = (f"bitsandbytes < 0.43: the text shows its old CUDA setup "
                                           f"('{m.group(0).strip()}', removed in 0.43.0)")
    if ev.torch_cuda_build is None:
        if m := re.search(r"CUDA used to build PyTorch: (\d+\.\d+)|py3\.\d+_cuda(\d+\.\d+)", flat):
            ev.torch_cuda_build = m.group(1) or m.group(2)
        elif re.search(r"Torch not compiled with CUDA enabled", flat):
            ev.torch_cuda_build = ""
        if ev.torch_cuda_build is not None:
            ev.said["torch_cuda_build"] = f"the text says torch is {_build_word(ev.torch_cuda_build)}"
    if m := re.search(r"(?i)(?:torch\.cuda\.is_available\(\)|CUDA available:|Is CUDA available:|Is CUDA enabled\?)"
                      r"\s*(True|False)", flat):
        ev.cuda_available = m.group(1).lower() == "true"
        ev.said["cuda_available"] = f"the text shows '{m.group(0)}'"
    elif ev.torch_cuda_build == "":
        ev.cuda_available = False
    no_gpu = next((m for p in _NO_NVIDIA_GPU if (m := re.search(p, flat))), None)
    gpu = next((m for p in _NVIDIA_GPU if (m := re.search(p, flat))), None)
    if gpu and not no_gpu:
        ev.gpu, ev.said["gpu"] = True, f"the text shows an NVIDIA GPU ('{gpu.group(0)}')"
    elif no_gpu or ev.os == "darwin":
        ev.gpu = False
        ev.said["gpu"] = (f"no NVIDIA GPU: the text says '{no_gpu.group(0)}'" if no_gpu else
                          "macOS: no NVIDIA GPU, no CUDA")
        if ev.cuda_available is None:
            ev.cuda_available = False
    ccs = [(_sm(m.group(1)), m.group(0)) for m in re.finditer(r"capability sm_(\d{2,3})", flat)]
    ccs += [(Version(m.group(1)), m.group(0)) for m in re.finditer(
        r"(?i)(?:cuda|compute) capability (?:\(CC\) |among GPUs detected: )?(\d+\.\d)", flat)]
    if not ccs:
        ccs = [(Version(cc), m.group(0)) for pattern, cc in _GPU_CC if (m := re.search(pattern, flat))]
    if ccs:
        ev.compute_capability, what = min(ccs)
        ev.said["compute_capability"] = f"the GPU has compute capability {ev.compute_capability} ('{what}')"
        if ev.gpu is None:
            ev.gpu = True
    if m := re.search(r"sm_(\d{2,3}) is not compatible with the current PyTorch installation\.?\s*The current PyTorch "
                      r"install supports CUDA capabilities ((?:sm_\d+\s*)+)", flat):
        gpu_sm, built = _sm(m.group(1)), [_sm(s) for s in re.findall(r"sm_(\d+)", m.group(2))]
        ev.gpu_vs_build = "newer" if gpu_sm > max(built) else "older" if gpu_sm < min(built) else None
    elif m := re.search(r"sm_(\d{2,3}) is not compatible with the current PyTorch installation", flat):
        ev.gpu_vs_build = "newer" if _sm(m.group(1)) >= Version("10.0") else None  # no release build had Blackwell
    elif re.search(r"no longer supports this GPU because it is too old", flat):
        ev.gpu_vs_build = "older"
    if ev.gpu_vs_build:
        ev.said["gpu_vs_build"] = (f"torch's warning: the GPU is {ev.gpu_vs_build} than every architecture this "
                                   f"build has")
    return ev


def _around(text: str, m: re.Match) -> str:
    """The matched word and what follows it up to the next blank or quote (a path reads better whole)."""
    return text[m.start():m.end() + 40].split()[0].strip("'\"`,")


def _os_word(name: str) -> str:
    return {"win32": "Windows paths", "darwin": "macOS", "linux": "Linux paths"}[name]


def _build_word(build: str | None) -> str:
    return "a CPU-only build" if build == "" else f"built for CUDA {build}"


# --------------------------------------------------------------------------------------------------------------
# Judging a cause

@struct
class View(Struct):
    """What is known of the environment: its description when there is one (complete), the text's evidence where
    the description does not say."""
    text: str
    flat: str
    ev: Evidence
    facts: Facts | None = None

    def package(self, name: str) -> tuple[str, Version | None, str] | None:
        """(op, version, said): op '==' (exact), '<' (below version), 'absent', 'present' (version unknown)."""
        if self.facts is not None:
            have = self.facts.packages.get(name)
            if have is None:
                return "absent", None, f"{name} is not installed"
            v = _version(have)
            return ("==", v, f"{name} {have}") if v else ("present", None, f"{name} {have} is installed")
        if name in self.ev.packages:
            op, v = self.ev.packages[name]
            return op, v, self.ev.said[f"pkg:{name}"]
        return None


def _spec_holds(spec: str, op: str, v: Version) -> bool | None:
    """Whether SPEC holds of a version known as OP V ('==' exact, '<' below V); None when the bound cannot say."""
    specs = SpecifierSet(spec, prereleases=True)
    if op == "==":
        return specs.contains(v)
    if all(s.operator in ("<", "<=") for s in specs):
        return True if all(Version(s.version) >= v for s in specs) else None
    if all(s.operator in (">", ">=", "==", "~=") for s in specs):
        return False if all(Version(s.version.rstrip(".*")) >= v for s in specs) else None
    return None


def judge(when: When, view: View) -> tuple[bool | None, int, list[str]]:
    """(applies, conditions shown, why): False when a condition is ruled out, True when every one is shown,
    None when some are not known; why says what showed each."""
    shown, out = 0, []

    def cond(value: bool | None, said: str) -> bool:
        nonlocal shown
        if value is False:
            return False
        if value is True:
            shown += 1
            out.append(said)
        return True

    unknown = False
    for name, spec in when.packages.items():
        have = view.package(name)
        if have is None:
            unknown = True
            continue
        op, v, said = have
        if spec == ABSENT:
            ok = op == "absent"
        elif op == "absent":
            ok = False
        elif spec == PRESENT:
            ok = True
        elif v is None:
            ok = None
        else:
            ok = _spec_holds(spec, op, v)
            if op == "==":
                said = f"{said} ({spec})"
        if ok is None:
            unknown = True
        elif not cond(ok, said):
            return False, shown, out
    facts, ev = view.facts, view.ev
    if facts is not None:
        gpu = bool(facts.gpus) or facts.cuda_available
        known = {"torch_cuda_build": (bool(facts.torch_cuda_build),
                                      f"torch is {_build_word(facts.torch_cuda_build or '')}"),
                 "cuda_available": (facts.cuda_available, "torch can use a CUDA GPU" if facts.cuda_available
                                    else "torch cannot use a CUDA GPU"),
                 "gpu": (gpu, "this machine has an NVIDIA GPU" if gpu else "this machine has no NVIDIA GPU"),
                 "bnb_native_library": (bool(facts.bnb_native_library),
                                        f"bitsandbytes loaded {facts.bnb_native_library}" if facts.bnb_native_library
                                        else "bitsandbytes loaded no native library")}
    else:
        known = {}
        if ev.torch_cuda_build is not None:
            known["torch_cuda_build"] = (ev.torch_cuda_build != "", ev.said.get("torch_cuda_build", ""))
        if ev.cuda_available is not None:
            known["cuda_available"] = (ev.cuda_available, ev.said.get("cuda_available") or ev.said.get("gpu", ""))
        if ev.gpu is not None:
            known["gpu"] = (ev.gpu, ev.said["gpu"])
    for attr in ("torch_cuda_build", "cuda_available", "gpu", "bnb_native_library"):
        want = getattr(when, attr)
        if want is None:
            continue
        if attr not in known:
            unknown = True
        elif not cond(known[attr][0] == want, known[attr][1]):
            return False, shown, out
    if when.compute_capability_below:
        limit = Version(when.compute_capability_below)
        ccs = [(cc, g.name) for g in (facts.gpus if facts else []) if (cc := _version(g.compute_capability or ""))]
        if ccs:
            cc, name = min(ccs, key=lambda x: x[0])
            said = f"{name or 'a GPU'} has compute capability {cc} < {limit}"
        elif ev.compute_capability is not None:
            cc, said = ev.compute_capability, f"{ev.said['compute_capability']} < {limit}"
        else:
            cc = None
        if cc is None:
            unknown = True
        elif not cond(cc < limit, said):
            return False, shown, out
    if when.gpu_vs_build:
        if ev.gpu_vs_build is None:
            unknown = True
        elif not cond(ev.gpu_vs_build == when.gpu_vs_build, ev.said["gpu_vs_build"]):
            return False, shown, out
    if when.os:
        os_name = (facts.os if facts else None) or ev.os
        said = f"the platform is {os_name}" if facts and facts.os else ev.said.get("os", "")
        if os_name is None:
            unknown = True
        elif not cond(os_name in when.os, said):
            return False, shown, out
    if when.text:
        m = next((m for p in when.text if (m := _search(p, view.text, view.flat))), None)
        if m:
            cond(True, f"the text shows '{m.group(0).strip()[:80]}'")
        else:
            unknown = True  # the text not saying it rules nothing out
    for pattern in when.text_not:
        if m := _search(pattern, view.text, view.flat):
            out.append(f"the text shows '{m.group(0).strip()[:80]}'")
            return False, shown, out
    for check in when.check_fails:
        if facts is None:
            unknown = True
        elif not cond(check in facts.checks_failed, f"the pre-check '{check}' fails"):
            return False, shown, out
    return (None if unknown else True), shown, out


# --------------------------------------------------------------------------------------------------------------
# Explaining

def matches(text: str, table: Table, flat: str | None = None) -> list[KnownError]:
    """The entries whose signatures TEXT shows (as pasted, or flattened: FLAT, by default flatten(text))."""
    flat = flatten(text) if flat is None else flat
    return [e for e in table.errors
            if any(_search(sig, text, flat) for sig in e.signatures)
            and not any(_search(sig, text, flat) for sig in e.unless)]


def _doc(cause: Cause) -> dict:
    return {"id": cause.id, "why": cause.why, "fix": cause.fix, "source": cause.source}


EVIDENCE_HEAD, EVIDENCE_TAIL = 100_000, 400_000


def _evidence_window(text: str) -> str:
    """What evidence is read from (and the reformatted text matched): all of TEXT, or for a long log its start
    (banners, versions) and its end (the traceback), which bounds the time a multi-megabyte log takes; signatures
    are still searched in all of it as pasted."""
    if len(text) <= EVIDENCE_HEAD + EVIDENCE_TAIL:
        return text
    return text[:EVIDENCE_HEAD] + "\n" + text[-EVIDENCE_TAIL:]


def explain(text: str, *, table: Table, facts: Facts | None = None) -> dict:
    """The known failures TEXT shows and, for each, the one cause that applies: decided by what the text shows, by
    FACTS (an environment's description) when given, or — when neither decides — the causes left, most likely
    first, and the command that tells them apart."""
    if not text.strip():
        raise UsageError("no error text to explain", fix="Pass the message, a log file, or pipe it in: "
                         "`python train.py 2>&1 | lorastrap explain -`.")
    window = _evidence_window(text)
    flat = flatten(window)
    entries = matches(text, table, flat)
    view = View(text=text, flat=flat, ev=read_evidence(window) if entries else Evidence(), facts=facts)
    found = []
    for entry in entries:
        item = {"id": entry.id, "title": entry.title, "source": entry.source, "cause": None, "causes": [],
                "ask": None}
        judged = [(i, c, *judge(c.when, view)) for i, c in enumerate(entry.causes)]
        left = [j for j in judged if j[2] is not False]
        if facts is not None:
            applies = next((j for j in judged if j[2] is True), None)
            if applies:
                item["cause"] = {**_doc(applies[1]), "because": applies[4], "decided_by": "environment"}
            else:
                item["causes"] = [_doc(c) for c in entry.causes]
        else:
            shown = [j for j in left if j[2] is True and j[3] > 0]
            if shown:
                i, cause, _, _, because = shown[0]
                item["cause"] = {**_doc(cause), "because": because, "decided_by": "text"}
            elif len(left) == 1:
                i, cause, _, _, because = left[0]
                item["cause"] = {**_doc(cause), "because": because or ["the only cause the text leaves"],
                                 "decided_by": "only cause"}
            else:
                prior = {cid: n for n, cid in enumerate(entry.likely_first)}
                ranked = sorted(left, key=lambda j: (-j[3], prior.get(j[1].id, len(prior)), j[0]))
                item["causes"] = [{**_doc(c), "because": because} for _, c, _, _, because in ranked]
                item["ask"] = entry.ask
                if not left:  # the text rules every known cause out: say so, and list them
                    item["ruled_out"] = True
                    item["causes"] = [{**_doc(c), "because": because} for _, c, _, _, because in judged]
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


# --------------------------------------------------------------------------------------------------------------
# The environment that produced the error, when explain can see it

STACK = ("torch", "transformers", "bitsandbytes", "peft", "accelerate")


def _has_stack(prefix: Path) -> bool:
    sp = pfx.site_packages(prefix)
    return sp is not None and any(next(sp.glob(f"{name}-*.dist-info"), None) for name in STACK)


def active_environment(environ: Mapping[str, str], which=shutil.which) -> tuple[Path | None, Path | None, str] | None:
    """The environment the user is in, when it has the stack installed: (prefix, python, how it was found).
    An activated venv ($VIRTUAL_ENV) first, then an activated conda environment ($CONDA_PREFIX), then the python on
    PATH; None when none of them has torch, transformers, bitsandbytes, peft or accelerate."""
    for var, what in (("VIRTUAL_ENV", "the active virtual environment ($VIRTUAL_ENV)"),
                      ("CONDA_PREFIX", "the active conda environment ($CONDA_PREFIX)")):
        value = environ.get(var)
        if value and Path(value).is_dir() and pfx.python_of(Path(value)) and _has_stack(Path(value)):
            return Path(value), None, what
    for name in ("python", "python3"):
        found = which(name, path=environ.get("PATH", os.defpath))
        if found:
            python = Path(found)
            if _has_stack(python.parent.parent):
                return None, python, f"the python on PATH ({python})"
    return None


# --------------------------------------------------------------------------------------------------------------
# Saying it

def format_explanation(result: dict, diag: doctor.Diagnosis | None = None) -> str:
    lines = []
    if result.get("environment_from"):
        lines.append(f"environment: {result['environment_from']} (--no-env to judge by the text alone)")
    for e in result["errors"]:
        lines.append(f"known failure: {e['title']}  [{e['id']}]")
        if e["cause"]:
            c = e["cause"]
            head = {"environment": "the cause here", "text": "the cause, from what the text shows",
                    "only cause": "the cause (the only one the text leaves)"}.get(c.get("decided_by"), "the cause")
            lines += [f"  {head}: {c['why']}"]
            if c.get("because"):
                lines.append(f"    because: {'; '.join(c['because'])}")
            lines += [f"    fix: {c['fix']}", f"    source: {c['source']}"]
        else:
            lines.append("  its known causes (" + ("none applies to this environment as described"
                                                  if result.get("environment") else
                                                  "none fits what the text shows" if e.get("ruled_out") else
                                                  "most likely first; pass --prefix or --python to learn which "
                                                  "applies") + "):")
            for c in e["causes"]:
                lines += [f"  - {c['why']}"]
                if c.get("because"):
                    lines.append(f"      {'; '.join(c['because'])}")
                lines += [f"      fix: {c['fix']}", f"      source: {c['source']}"]
            if e.get("ask"):
                lines.append(f"  to tell them apart, run: {e['ask']}")
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
