"""Step 2: from what the machine has (model.Machine) and the matrix (profiles.Matrix) to a choice, with reasons.

A pure function: no I/O.  Every rule it checks comes from envs/profiles.yaml; nothing here knows a GPU by name.
"""

from __future__ import annotations

from typing import Literal

from lorastrap.core import versions
from lorastrap.core.plain import Field, Plain, record
from lorastrap.machine.model import Machine
from lorastrap.core.errors import NoProfileError
from lorastrap.matrix.profiles import Matrix, Profile

SCHEMA_VERSION = 1


@record
class Check(Plain):
    rule: str
    ok: bool
    message: str
    source: str | None = None


@record
class Candidate(Plain):
    profile: str
    auto: bool
    fits: bool
    checks: list[Check]

    @property
    def unmet(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@record
class Warning_(Plain):
    severity: Literal["info", "warning"]
    message: str
    source: str | None = None


@record
class Plan(Plain):
    schema_version: int = SCHEMA_VERSION
    profile: str | None = Field(description="the chosen profile; null when none fits")
    forced: bool = Field(False, description="chosen with --profile")
    platform: str | None
    reasons: list[str] = Field(description="why this profile")
    broken: list[Check] = Field(default_factory=list, description="requirements a forced profile does not meet")
    warnings: list[Warning_] = Field(default_factory=list)
    hints: list[str] = Field(default_factory=list, description="what would unlock a better profile")
    alternatives: list[str] = Field(default_factory=list, description="other automatic profiles that also fit "
                                                                      "(lower priority), each installable with "
                                                                      "--profile")
    candidates: list[Candidate]


def _fmt_ccs(ccs: list[str]) -> str:
    return ", ".join(sorted(set(ccs), key=versions.key))


def device_ccs(machine: Machine) -> list[str]:
    """The compute capabilities to judge: the __cuda_arch override if given, else every CUDA device's."""
    if "CONDA_OVERRIDE_CUDA_ARCH" in machine.overrides and machine.cuda_arch:
        return [machine.cuda_arch]
    return [d.compute_capability for d in machine.devices if d.compute_capability]


def _probe_states(machine: Machine, *, errors_only: bool = False) -> str:
    """'NVML: LibraryNotFound, libcuda: NO_DEVICE' — what the probes that failed said."""
    skip = {"ok", "not-run"} | ({"LibraryNotFound"} if errors_only else set())
    names = {"nvml": "NVML", "libcuda": "libcuda"}
    return ", ".join(f"{names[p.name]}: {p.status}" for p in machine.nvidia.probes
                     if p.name in names and p.status not in skip) or (
        "" if machine.nvidia.probes or machine.nvidia.nvml_status in skip else f"NVML: {machine.nvidia.nvml_status}")


def check(profile: Profile, machine: Machine) -> list[Check]:
    checks = [Check(rule="platform", ok=machine.platform in profile.platforms,
                    message=f"platform {machine.platform or machine.arch + ' (unsupported)'} "
                            f"{'is' if machine.platform in profile.platforms else 'is not'} one of "
                            f"{', '.join(profile.platforms)}")]
    req = profile.requires
    cuda = machine.cuda
    if req.gpu is not None and req.gpu.value:
        # __cuda says what the driver supports; a GPU also needs a CUDA device (or a CUDA override: another node).
        has_device = bool(machine.devices) or "CONDA_OVERRIDE_CUDA" in machine.overrides
        if cuda is None:
            why = "no usable NVIDIA GPU" + (f" ({_probe_states(machine)})" if _probe_states(machine) else "")
        elif not has_device:
            why = f"the driver supports CUDA {cuda} but no CUDA device is visible"
        else:
            how = f", found by {machine.nvidia.answered_by}" if machine.nvidia.answered_by else ""
            why = f"driver supports CUDA {cuda}{how}"
        checks.append(Check(rule="gpu", ok=cuda is not None and has_device,
                            message=f"needs an NVIDIA GPU: {why}", source=req.gpu.source))
    if req.driver_cuda_min is not None:
        need = req.driver_cuda_min.value
        ok = cuda is not None and versions.key(cuda) >= versions.key(need)
        checks.append(Check(rule="driver_cuda_min", ok=ok,
                            message=f"driver must support CUDA >= {need}: "
                                    + (f"it supports {cuda}" if cuda else "no CUDA driver"),
                            source=req.driver_cuda_min.source))
    if req.compute_capability is not None and cuda is not None:
        lo, hi = req.compute_capability.min, req.compute_capability.max
        ccs = device_ccs(machine)
        if not ccs:
            checks.append(Check(rule="compute_capability", ok=True,
                                message="compute capability unknown (set CONDA_OVERRIDE_CUDA_ARCH to check it)",
                                source=req.compute_capability.source))
        else:
            bad = [cc for cc in ccs if not (versions.key(lo) <= versions.key(cc) <= versions.key(hi))]
            checks.append(Check(rule="compute_capability", ok=not bad,
                                message=f"every GPU's compute capability must be in {lo}..{hi}: "
                                        + (f"{_fmt_ccs(bad)} outside" if bad else f"{_fmt_ccs(ccs)} inside"),
                                source=req.compute_capability.source))
    if req.cuda_code is not None and cuda is not None:
        ccs = sorted(set(device_ccs(machine)), key=versions.key)
        source = "; ".join(f"{r.component}: {r.source}" for r in req.cuda_code)
        if not ccs:
            checks.append(Check(rule="cuda_code", ok=True, source=source,
                                message="compute capability unknown (set CONDA_OVERRIDE_CUDA_ARCH to check it)"))
        else:
            missing = [(cc, r) for cc in ccs for r in req.cuda_code if r.runs_on(cc) is None]
            if missing:
                message = "; ".join(f"compute capability {cc} has no code in {r.component} ({r.summary()})"
                                    for cc, r in missing)
            else:
                message = "every GPU runs each build's code: " + "; ".join(
                    f"{cc} ({', '.join(f'{r.component.split()[0]} {r.runs_on(cc)}' for r in req.cuda_code)})"
                    for cc in ccs)
            checks.append(Check(rule="cuda_code", ok=not missing, message=message, source=source))
    board = machine.nvidia.jetson
    if req.jetson is not None:
        is_jetson = board is not None
        want = req.jetson.value
        checks.append(Check(rule="jetson", ok=is_jetson == want, source=req.jetson.source,
                            message=(f"{'only' if want else 'not'} for Jetson boards: "
                                     + (f"this is one ({board.model or 'L4T ' + str(board.l4t)})" if is_jetson
                                        else "this is not one"))))
    if req.jetson_l4t_min is not None and board is not None:
        need = req.jetson_l4t_min.value
        ok = board.l4t is not None and versions.key(board.l4t) >= versions.key(need)
        checks.append(Check(rule="jetson_l4t_min", ok=ok, source=req.jetson_l4t_min.source,
                            message=f"a Jetson board needs Jetson Linux (L4T) >= {need}: "
                                    + (f"it runs {board.l4t}" + (f" (JetPack {board.jetpack})" if board.jetpack
                                                                 else "") if board.l4t else "its release is unknown")))
    if req.gpu_memory_min_mib is not None and cuda is not None:
        need = req.gpu_memory_min_mib.value
        mems = [d.memory_total_mib for d in machine.devices if d.memory_total_mib is not None]
        if mems:
            small = [m for m in mems if m < need]
            checks.append(Check(rule="gpu_memory_min_mib", ok=not small,
                                message=f"every CUDA device needs >= {need} MiB: "
                                        + (f"smallest has {min(mems)} MiB"),
                                source=req.gpu_memory_min_mib.source))
    if req.glibc_min is not None and machine.os == "linux":
        glibc = machine.glibc
        ok = glibc is None or versions.key(glibc) >= versions.key(req.glibc_min.value)
        checks.append(Check(rule="glibc_min", ok=ok,
                            message=f"glibc must be >= {req.glibc_min.value}: it is {glibc or 'unknown'}",
                            source=req.glibc_min.source))
    return checks


def _driver_hint(matrix: Matrix, machine: Machine, profile: Profile) -> tuple[str, str]:
    """('driver >= 580.65.06', 'CUDA 13.x; source: ...') for the profile's driver_cuda_min."""
    need = profile.requires.driver_cuda_min
    major = need.value.split(".")[0]
    row = {d.cuda: d for d in matrix.cuda_drivers}.get(major)
    windows = machine.os == "win" or machine.wsl
    driver = row and (row.windows if windows else row.linux)
    if not driver:
        return f"a driver supporting CUDA {need.value}", need.source
    return f"{'Windows ' if windows else ''}driver >= {driver}", f"CUDA {major}.x; source: {row.source}"


# Rules a user can meet without new hardware, and how to say what meets them.
UPGRADES = ("driver_cuda_min", "jetson_l4t_min", "glibc_min")


def _upgrade(matrix: Matrix, machine: Machine, profile: Profile, rule: str) -> tuple[str, str]:
    req = profile.requires
    if rule == "driver_cuda_min":
        return _driver_hint(matrix, machine, profile)
    if rule == "jetson_l4t_min":
        return f"Jetson Linux (L4T) >= {req.jetson_l4t_min.value}", req.jetson_l4t_min.source
    return f"glibc >= {req.glibc_min.value} (a newer OS release)", req.glibc_min.source


def _upgrade_hint(matrix: Matrix, machine: Machine, name: str, rules: set[str]) -> str:
    parts = [_upgrade(matrix, machine, matrix.profiles[name], r) for r in UPGRADES if r in rules]
    if len(parts) == 1:
        return f"{parts[0][0]} enables {name} ({' '.join(parts[0][1].split())})"
    return (" and ".join(p[0] for p in parts) + f" together enable {name} "
            f"(`lorastrap plan --why-not {name}` gives each rule's source)")


def _gpu_machine(machine: Machine) -> bool:
    return bool(machine.devices) or machine.cuda is not None or machine.nvidia.jetson is not None


def _hints(matrix: Matrix, machine: Machine, candidates: list[Candidate], chosen: str | None) -> list[str]:
    chosen_priority = matrix.profiles[chosen].priority if chosen else -1
    hints = []
    nvml_blocked = []
    for cand in candidates:
        profile = matrix.profiles[cand.profile]
        if not cand.auto or cand.fits or profile.priority <= chosen_priority:
            continue
        unmet = {c.rule for c in cand.unmet}
        if unmet and unmet <= set(UPGRADES):
            hints.append(_upgrade_hint(matrix, machine, cand.profile, unmet))
        elif "gpu" in unmet and _probe_states(machine, errors_only=True):
            nvml_blocked.append(cand.profile)
        elif "compute_capability" in unmet and machine.cuda is not None:
            cc = profile.requires.compute_capability
            hints.append(f"{cand.profile} supports compute capability {cc.min}..{cc.max} only "
                         f"(this machine: {_fmt_ccs(device_ccs(machine))})")
    if nvml_blocked:
        hints.append(f"fixing the driver error ({_probe_states(machine, errors_only=True)}; see `lorastrap detect`) "
                     f"may enable {', '.join(nvml_blocked)}")
    chosen_gpu = chosen is not None and bool(matrix.profiles[chosen].requires.gpu and
                                             matrix.profiles[chosen].requires.gpu.value)
    if not hints and not chosen_gpu and _gpu_machine(machine):
        # A GPU machine planned without a GPU profile always hears why, profile by profile.
        gpu_profiles = [c for c in candidates if c.auto and matrix.profiles[c.profile].requires.gpu
                        and matrix.profiles[c.profile].requires.gpu.value]
        here = [c for c in gpu_profiles if all(k.ok for k in c.checks if k.rule == "platform")]
        if not here:
            hints.append(f"no GPU profile is offered for {machine.platform or machine.arch} (GPU profiles: "
                         + ", ".join(f"{c.profile} on {', '.join(matrix.profiles[c.profile].platforms)}"
                                     for c in gpu_profiles) + ")")
        else:
            hints.append("no GPU profile fits this GPU machine: " + "; ".join(
                f"{c.profile}: {' / '.join(u.message for u in c.unmet)}" for c in here))
    return hints


def _warnings(matrix: Matrix, machine: Machine, profile: Profile) -> list[Warning_]:
    out = [Warning_(severity=n.severity, message=n.message, source=n.source) for n in profile.notes]
    if profile.requires.gpu is not None and profile.requires.gpu.value:
        ccs = device_ccs(machine)
        for adv in matrix.advisories:
            low = [cc for cc in ccs if versions.key(cc) < versions.key(adv.compute_capability_below)]
            if low:
                out.append(Warning_(severity=adv.severity, message=f"GPU compute capability {_fmt_ccs(low)}: "
                                    + adv.message, source=adv.source))
    return out


def plan(machine: Machine, matrix: Matrix, *, profile: str | None = None) -> Plan:
    """Choose the best-fitting automatic profile (highest priority whose rules all pass), or judge a forced one."""
    candidates = [Candidate(profile=name, auto=p.auto, fits=all(c.ok for c in checks), checks=checks)
                  for name, p in sorted(matrix.profiles.items(), key=lambda kv: -kv[1].priority)
                  for checks in [check(p, machine)]]
    by_name = {c.profile: c for c in candidates}
    if profile is not None:
        from lorastrap.matrix.profiles import get
        chosen = get(matrix, profile)
        cand = by_name[profile]
        reasons = [f"{profile} was asked for by name (--profile)"]
        if cand.fits:
            reasons.append("it meets all its requirements here")
        return Plan(profile=profile, forced=True, platform=machine.platform, reasons=reasons, broken=cand.unmet,
                    warnings=_warnings(matrix, machine, chosen), hints=[], candidates=candidates)
    fitting = [c for c in candidates if c.auto and c.fits]
    if not fitting:
        return Plan(profile=None, platform=machine.platform,
                    reasons=["no automatic profile meets its requirements here"],
                    hints=_hints(matrix, machine, candidates, None), candidates=candidates)
    best = fitting[0]
    chosen = matrix.profiles[best.profile]
    reasons = [f"{best.profile}: {chosen.description}"] + [c.message for c in best.checks]
    is_gpu = bool(chosen.requires.gpu and chosen.requires.gpu.value)
    alternatives = [c.profile for c in fitting[1:]
                    if bool(matrix.profiles[c.profile].requires.gpu and matrix.profiles[c.profile].requires.gpu.value)
                    == is_gpu]
    if alternatives:
        reasons.append(f"chosen over {', '.join(alternatives)}, which also fit"
                       + (f": {chosen.preferred}" if chosen.preferred else f" (priority {chosen.priority} is higher)"))
    here = [c for c in candidates if all(k.ok for k in c.checks if k.rule == "platform")]
    passed_over = [c for c in here if c.auto and not c.fits and matrix.profiles[c.profile].priority > chosen.priority]
    for cand in passed_over:
        reasons.append(f"not {cand.profile}: " + "; ".join(c.message for c in cand.unmet))
    if is_gpu:
        # The GPU profiles for this platform that rank lower and do not fit: why (a V100 and CUDA 13, say).
        for cand in here:
            if cand.auto and not cand.fits and cand not in passed_over and matrix.profiles[cand.profile].requires.gpu:
                reasons.append(f"not {cand.profile}: " + "; ".join(c.message for c in cand.unmet))
    return Plan(profile=best.profile, platform=machine.platform, reasons=reasons,
                warnings=_warnings(matrix, machine, chosen), hints=_hints(matrix, machine, candidates, best.profile),
                alternatives=alternatives, candidates=candidates)


def require_profile(result: Plan) -> str:
    if result.profile is None:
        raise NoProfileError("no environment profile fits this machine",
                             why="; ".join(f"{c.profile}: " + "; ".join(u.message for u in c.unmet)
                                           for c in result.candidates if c.auto),
                             fix="See `lorastrap plan --why-not NAME`, or force one with --profile NAME.")
    return result.profile


def _unjudged(profile: Profile, checks: list[Check]) -> list[tuple[str, str]]:
    """The rules of PROFILE that CHECKS did not judge here (no GPU, not a Jetson board, not Linux, no memory
    figure), as (the rule, its source), so `--why-not` lists every rule."""
    req, judged = profile.requires, {c.rule for c in checks}
    no_gpu = any(c.rule == "gpu" and not c.ok for c in checks)
    why_gpu = "not judged: no usable NVIDIA GPU here" if no_gpu else "not judged: unknown here"
    out = []
    if req.compute_capability and "compute_capability" not in judged:
        out.append((f"every GPU's compute capability must be in {req.compute_capability.min}.."
                    f"{req.compute_capability.max} ({why_gpu})", req.compute_capability.source))
    for r in (req.cuda_code or []) if "cuda_code" not in judged else []:
        out.append((f"every GPU must run the code of {r.component} ({r.summary()}) ({why_gpu})", r.source))
    if req.gpu_memory_min_mib and "gpu_memory_min_mib" not in judged:
        out.append((f"every CUDA device needs >= {req.gpu_memory_min_mib.value} MiB "
                    f"({why_gpu if no_gpu else 'not judged: the GPUs report no memory size'})",
                    req.gpu_memory_min_mib.source))
    if req.jetson_l4t_min and "jetson_l4t_min" not in judged:
        out.append((f"a Jetson board needs Jetson Linux (L4T) >= {req.jetson_l4t_min.value} (not judged: this is "
                    "not a Jetson board)", req.jetson_l4t_min.source))
    if req.glibc_min and "glibc_min" not in judged:
        out.append((f"glibc must be >= {req.glibc_min.value} (not judged: not Linux)", req.glibc_min.source))
    return out


def format_plan(result: Plan, why_not: str | None = None, profile: Profile | None = None) -> str:
    """The plan as text; with WHY_NOT (and that profile), every rule of it, met, unmet or not judged here, each
    with its source."""
    lines = []
    if why_not:
        cand = next(c for c in result.candidates if c.profile == why_not)
        if cand.fits:
            role = (" and is the one chosen" if why_not == result.profile and not result.forced else
                    f" (an alternative to {result.profile}: `--profile {why_not}` installs it)"
                    if why_not in result.alternatives else "" if cand.auto else " (chosen only by name)")
            lines.append(f"{why_not} fits this machine{role}:")
        else:
            lines.append(f"{why_not} does not fit this machine:")
        for c in cand.checks:
            lines.append(f"  [{'ok' if c.ok else 'unmet'}] {c.message}" + (f"\n      source: {c.source}" if c.source else ""))
        for text, source in _unjudged(profile, cand.checks) if profile is not None else []:
            lines.append(f"  [-] {text}" + (f"\n      source: {source}" if source else ""))
        return "\n".join(lines)
    if result.profile is None:
        lines.append("no profile fits this machine")
    else:
        lines.append(f"profile: {result.profile}" + (" (forced)" if result.forced else ""))
    lines += [f"  - {r}" for r in result.reasons]
    for c in result.broken:
        lines.append(f"  ! breaks: {c.message}")
    for w in result.warnings:
        lines.append(f"  [{w.severity}] {w.message}")
    for name in result.alternatives:
        lines.append(f"  alternative: {name} also fits (`--profile {name}`; `--why-not {name}` shows its rules)")
    for h in result.hints:
        lines.append(f"  hint: {h}")
    return "\n".join(lines)
