"""Fleets through Slurm: provision, verify and report the nodes of a partition, from a login node without GPUs.

    login node   lorastrap fleet slurm --bundle B [--bundle B2 …] --report-dir D [--partition P] [--nodelist L]
                 asks Slurm which of the nodes can run a job (sinfo), submits deploy/slurm/lorastrap-fleet.sbatch on
                 them (one task per node), waits, then joins the node reports into D/fleet.json and prints the table
    each node    lorastrap fleet node …   (srun --ntasks-per-node=1, inside the batch script)
                 detects the node (or reads its recorded `detect --json`: --machines DIR/NODE.json), plans over the
                 bundles' profiles, runs `lorastrap install --bundle` with the bundle of the profile it plans,
                 verifies the environment on this node, writes D/NODE.json
    the report   lorastrap fleet report --report-dir D   (the batch script's last step, and the login node's)

A node's report is the JSON `lorastrap install --report` writes (schema_version 1) plus "node" and "slurm_job"; a
node that fails writes {"ok": false, "error", "exit_code"}; a node Slurm never started has no report and is listed
as "not-started" with the scheduler's reason.  The rows and the table are deploy/ansible/fleet_report.py's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path

from lorastrap.core import fsutil, paths, signals, subproc
from lorastrap.core.errors import (FLEET_INCOMPLETE, INTERNAL, INTERRUPTED, PREREQ, VERIFY, ConfigError, LorastrapError, NoProfileError,
                              UsageError)
from lorastrap.core.plain import Struct, struct

RUN_FILE = "slurm-run.json"  # what the login node asked Slurm for: the nodes, and why some were not started
FLEET_FILE = "fleet.json"
INSTALL_TIMEOUT_S = 4 * 3600.0
SLURM_TIMEOUT_S = 60.0
# sinfo's long node states a job can be started on (it may wait for "allocated" ones); any other state, or a "*"
# suffix (not responding), means the scheduler will not start a task there.
STARTABLE = {"idle", "mixed", "allocated", "completing", "planned"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY"}


@struct
class NodeOptions(Struct):
    """What every node does; the same flags for `fleet node`, `fleet report` and the batch script."""
    bundles: list[Path]
    report_dir: Path
    prefix: str | None = None  # may hold %n (the node name); default: the node's data dir's envs/lora
    home: str | None = None  # the node's LORASTRAP_HOME (%n allowed); default: DATA_DIR/nodes/%n
    profile: str | None = None
    machines: Path | None = None  # recorded `detect --json` per node: DIR/NODE.json
    pkgs_dir: Path | None = None  # the shared package cache; default: LORASTRAP_PKGS_DIR or DATA_DIR/pkgs
    extra: list[str] = field(default_factory=list)  # more `lorastrap install` flags
    repair: bool = False  # rebuild an environment that fails verification (from its own lock), then verify again

    def argv(self) -> list[str]:
        out = []
        for b in self.bundles:
            out += ["--bundle", str(b)]
        out += ["--report-dir", str(self.report_dir)]
        for flag, value in (("--prefix", self.prefix), ("--home", self.home), ("--profile", self.profile),
                            ("--machines", self.machines), ("--pkgs-dir", self.pkgs_dir)):
            if value:
                out += [flag, str(value)]
        for e in self.extra:
            out.append(f"--install-arg={e}")
        if self.repair:
            out.append("--repair")
        return out

    def shared_prefix(self) -> bool:
        return bool(self.prefix) and "%n" not in self.prefix


def _expand(template: str, node: str) -> Path:
    return Path(template.replace("%n", node)).expanduser().absolute()


def node_name() -> str:
    """Slurm's name for this node (SLURMD_NODENAME inside a job), else the short hostname."""
    return os.environ.get("SLURMD_NODENAME") or fsutil.hostname().split(".")[0]


def fleet_report_module():
    """deploy/ansible/fleet_report.py, the one fleet table (shared with the Ansible path)."""
    path = paths.DEPLOY / "ansible" / "fleet_report.py"
    spec = importlib.util.spec_from_file_location("lorastrap_fleet_report", path)
    if spec is None or not path.is_file():
        raise ConfigError(f"{path} is missing", why="this lorastrap was installed without its deploy/ folder",
                          fix="Run lorastrap from a checkout or a bundle's source/ folder.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_json(path: Path, doc: dict) -> None:
    fsutil.write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def run_dir(report_dir: Path, job: str | None = None) -> Path:
    """Where one run's reports go: REPORT_DIR/job-JOB inside (or for) a Slurm job, so that runs sharing a report
    folder never mix; REPORT_DIR itself outside Slurm."""
    job = job or os.environ.get("SLURM_JOB_ID")
    return report_dir / f"job-{job}" if job else report_dir


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _node_command() -> str:
    """The lorastrap command on the nodes, as an admin types it there."""
    return os.environ.get("LORASTRAP") or "lorastrap"


def check_options(opts: NodeOptions) -> dict[tuple[str, str], Path]:
    """The bundles by (profile, platform); refuses what cannot work on any node."""
    from lorastrap.install import bundles
    if not opts.bundles:
        raise UsageError("no bundle given", fix="Pass --bundle PATH (one per profile the nodes may need).")
    found: dict[tuple[str, str], Path] = {}
    for b in opts.bundles:
        where = bundles.open_bundle(b)
        manifest = bundles.check(where)
        key = (manifest.profile, manifest.platform)
        if key in found:
            raise UsageError(f"two bundles for profile {key[0]} on {key[1]}: {found[key]} and {where}",
                             fix="Pass one bundle per profile and platform.")
        found[key] = where
    if opts.profile and opts.profile not in {p for p, _ in found}:
        raise UsageError(f"--profile {opts.profile}: none of the bundles holds it "
                         f"(they hold {', '.join(sorted({p for p, _ in found}))})",
                         fix=f"Bundle it: `lorastrap bundle --profile {opts.profile} --platform PLATFORM -o PATH`.")
    if opts.shared_prefix() and len({p for p, _ in found}) > 1 and not opts.profile:
        raise UsageError(f"one shared prefix ({opts.prefix}) for nodes that may plan different profiles",
                         why="each node installs the profile it plans; on one shared prefix they would replace "
                             "each other's environment",
                         fix="Put %n (the node name) in --prefix for one environment per node, or choose one "
                             "profile for every node with --profile.")
    return found


# --------------------------------------------------------------------------------------------------------------
# One node (runs inside the job, one task per node)

def _machine(opts: NodeOptions, node: str):
    from lorastrap.machine.detect import detect
    from lorastrap.machine.model import Machine
    if opts.machines:
        recorded = opts.machines / f"{node}.json"
        if recorded.is_file():
            try:
                return Machine.model_validate_json(recorded.read_text()), recorded
            except ValueError as exc:
                raise ConfigError(f"{recorded}: not a machine description", why=str(exc).splitlines()[0],
                                  fix="Write it with `lorastrap detect --json` on that node.") from exc
    return detect(), None


def choose(machine, matrix, bundles: dict[tuple[str, str], Path], profile: str | None, node: str):
    """(profile, bundle, plan) for this node: the profile its machine plans, or the forced one if it can run it."""
    from lorastrap.matrix import plan as planner
    if profile:
        result = planner.plan(machine, matrix, profile=profile)
        if result.broken:
            raise NoProfileError(f"profile {profile} cannot run on node {node}",
                                 why="; ".join(c.message for c in result.broken),
                                 fix="Leave this node out (--nodelist), or drop --profile so that each node gets "
                                     "the profile it plans (with a bundle for each).")
    else:
        result = planner.plan(machine, matrix)
        profile = planner.require_profile(result)
    where = bundles.get((profile, machine.platform))
    if where is None:
        given = ", ".join(f"{p} ({pl})" for p, pl in sorted(bundles))
        raise NoProfileError(f"node {node} plans profile {profile} on {machine.platform}, and no bundle for it was "
                             f"given", why=f"bundles given: {given}; " + "; ".join(result.reasons[:2]),
                             fix=f"Bundle it too (`lorastrap bundle --profile {profile} --platform "
                                 f"{machine.platform} -o PATH`) and add --bundle PATH, or give every node one "
                                 f"profile with --profile.")
    return profile, where, result


def _node_env(opts: NodeOptions, home: Path) -> dict:
    pkgs = opts.pkgs_dir or paths.cache_dir()
    return subproc.clean_env(drop=("LORASTRAP_HOME", "LORASTRAP_PKGS_DIR"), LORASTRAP_HOME=str(home),
                             LORASTRAP_PKGS_DIR=str(pkgs))


def _install(opts: NodeOptions, where: Path, prefix: Path, env: dict, machine_file: Path | None, log: Path) -> dict:
    argv = [sys.executable, "-m", "lorastrap", "install", "--bundle", str(where), "--prefix", str(prefix), "--json",
            *opts.extra]
    if machine_file:
        argv += ["--machine", str(machine_file)]
    res = subproc.run(argv, timeout=INSTALL_TIMEOUT_S, env=env)
    log.write_text(res.stderr)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = None
    if res.ok and doc and doc.get("ok"):
        return doc
    if doc and doc.get("what"):
        raise LorastrapError(doc["what"], why=doc.get("why", ""), fix=doc.get("fix", ""),
                             exit_code=doc.get("exit_code") or 1)
    last = next((line.strip() for line in reversed(res.stderr.splitlines()) if line.strip()), "no output")
    raise LorastrapError(f"lorastrap install failed on this node ({'timed out' if res.timed_out else res.returncode}):"
                         f" {last}", why="it wrote no result (an error lorastrap did not explain: a bug, or a crash)",
                         fix=f"See {log}.", exit_code=res.returncode or 1)


def _repair_argv(prefix: str, where: Path) -> list[str]:
    """`lorastrap repair` for this environment, with the envs dir it was installed with (the bundle's)."""
    return ["repair", "--prefix", prefix, "--envs-dir", str(where / "envs"), "--yes", "--no-verify"]


def _verify_here(doc: dict, profile, matrix, machine, opts: NodeOptions, where: Path, env: dict, log: Path) -> None:
    """Run the profile's verification on this node's own devices (install verified only if it changed something);
    with --repair, an environment that fails it is rebuilt from its own lock and verified again."""
    from lorastrap.install import verify
    if doc.get("verify_verdict") == "pass" or "--no-verify" in opts.extra:
        return
    prefix = doc["prefix"]
    try:
        doc["verify"] = verify.verify_profile(Path(prefix), profile, matrix=matrix, driver_cuda=machine.cuda)
    except LorastrapError as exc:
        if not opts.repair:
            fix_env = f"LORASTRAP_HOME={env['LORASTRAP_HOME']} LORASTRAP_PKGS_DIR={env['LORASTRAP_PKGS_DIR']}"
            raise LorastrapError(f"the environment at {prefix} failed verification on this node: "
                                 + " ".join(profile.verify), why=exc.why,
                                 fix=f"On this node, `{_node_command()} doctor --prefix {prefix} --envs-dir "
                                     f"{where / 'envs'}` says why; `{fix_env} {_node_command()} "
                                     + " ".join(_repair_argv(prefix, where)) + "` rebuilds it from its own lock "
                                     "(or run the fleet again with --repair).", exit_code=VERIFY)
        res = subproc.run([sys.executable, "-m", "lorastrap", *_repair_argv(prefix, where), "--json"],
                          timeout=INSTALL_TIMEOUT_S, env=env)
        with open(log, "a") as f:
            f.write(f"\n--- verification failed ({exc.what}); lorastrap repair:\n" + res.stderr)
        if not res.ok:
            last = next((line for line in reversed(res.stderr.splitlines()) if line.strip()), "no output")
            raise LorastrapError(f"the environment at {prefix} failed verification and its repair failed: {last}",
                                 why=exc.why, fix=f"See {log}.", exit_code=res.returncode or VERIFY)
        doc["repaired"] = f"it failed verification ({exc.what}); rebuilt from its own lock (--repair)"
        doc["changed"] = True
        doc["verify"] = verify.verify_profile(Path(prefix), profile, matrix=matrix, driver_cuda=machine.cuda)
    doc["verify_verdict"] = doc["verify"]["verdict"]


def _plan_doc(plan, profile: str | None) -> dict:
    """The plan as the report carries it, and the one-line reason the node got its profile."""
    if plan is None:
        return {}
    reason = (f"forced by --profile {profile}" if plan.forced else
              "; ".join(r for r in plan.reasons[:2] if r)) or "-"
    return {"plan": {"profile": plan.profile, "forced": plan.forced, "reasons": plan.reasons,
                     "warnings": plan.warnings}, "reason": reason}


def _machine_doc(machine) -> dict | None:
    from lorastrap.machine.render import summary
    return None if machine is None else summary(machine)


def run_node(opts: NodeOptions, narrate=lambda m: None) -> tuple[dict, LorastrapError | None]:
    """Provision and verify this node; its report is written to RUN_DIR/NODE.json whatever happens (RUN_DIR:
    REPORT_DIR/job-JOB inside a Slurm job), its log to RUN_DIR/NODE.log."""
    from lorastrap import __version__
    from lorastrap.install import bundles
    from lorastrap.matrix import profiles
    node = node_name()
    folder = run_dir(opts.report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out, log = folder / f"{node}.json", folder / f"{node}.log"
    base = {"schema_version": 1, "host": node, "node": node, "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "lorastrap_version": __version__, "log": str(log)}
    started = _now()
    # Until the end, the report says the task started and did not finish (a time limit or a node failure kills it).
    _write_json(out, {**base, "ok": False, "exit_code": None, "finished_at": None,
                      "error": f"started at {started} and did not finish (killed by a time limit, a node failure "
                               f"or a cancelled job?)"})
    t0 = time.perf_counter()
    known: dict = {}  # what the node learnt before it failed: its machine, its profile and why, its bundle
    try:
        found = check_options(opts)
        machine, machine_file = _machine(opts, node)
        known["machine"] = _machine_doc(machine)
        matrix = profiles.load(bundles.open_bundle(next(iter(found.values()))) / "envs")
        if opts.profile:
            known["reason"] = f"forced by --profile {opts.profile}"
        name, where, plan = choose(machine, matrix, found, opts.profile, node)
        known.update(profile=name, bundle=bundles.identity(where), **_plan_doc(plan, opts.profile))
        home = _expand(opts.home, node) if opts.home else paths.data_dir() / "nodes" / node
        prefix = _expand(opts.prefix, node) if opts.prefix else home / "envs" / "lora"
        narrate(f"{node}: profile {name} ({known['reason']}) from {where} → {prefix}")
        env = _node_env(opts, home)
        doc = _install(opts, where, prefix, env, machine_file, log)
        _verify_here(doc, matrix.profiles[name], matrix, machine, opts, where, env, log)
        doc.update(base)
        doc.update({k: v for k, v in known.items() if k not in ("machine", "profile")})
        doc["machine_source"] = str(machine_file) if machine_file else "detected"
        doc["timings"]["node_total"] = time.perf_counter() - t0
        doc["finished_at"] = _now()
        _write_json(out, doc)
        return doc, None
    except Exception as exc:  # whatever went wrong is the node's report, not a traceback lost in a job log
        if not isinstance(exc, LorastrapError):
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            exc = LorastrapError(f"internal error: {type(exc).__name__}: {exc}",
                                 fix=f"This is a bug in lorastrap; report it with this node's log ({log}).",
                                 exit_code=INTERNAL)
        doc = {**base, **known, "ok": False, "exit_code": exc.exit_code, "error": exc.what.splitlines()[0],
               "why": exc.why, "fix": exc.fix, "finished_at": _now()}
        _write_json(out, doc)
        return doc, exc


# --------------------------------------------------------------------------------------------------------------
# The report

def _slurm(argv: list[str], env: dict | None = None, timeout: float = SLURM_TIMEOUT_S) -> subproc.Result:
    if not shutil.which(argv[0]):
        raise LorastrapError(f"Slurm's {argv[0]} is not on PATH", why="the fleet runs through the Slurm scheduler",
                             fix="Run this on a login node of the cluster (e.g. after `module load slurm`).",
                             exit_code=PREREQ)
    return subproc.run(argv, timeout=timeout, env=env)


def job_nodes() -> list[str]:
    """The nodes of the job this runs in (SLURM_JOB_NODELIST, expanded by scontrol)."""
    listed = os.environ.get("SLURM_JOB_NODELIST")
    if not listed:
        return []
    res = _slurm(["scontrol", "show", "hostnames", listed])
    return res.stdout.split() if res.ok else []


def _read_run(report_dir: Path, job: str | None) -> dict:
    """What the login node asked Slurm for in this job: RUN_DIR/slurm-run.json, else REPORT_DIR/slurm-run.json
    while it is still about this job (written before sbatch answered with the job's id)."""
    for where in (run_dir(report_dir, job) / RUN_FILE, report_dir / RUN_FILE):
        try:
            run = json.loads(where.read_text())
        except (OSError, ValueError):
            continue
        if run.get("job") in (None, job) or not job:
            return run
    return {}


def report(report_dir: Path, hosts: list[str] | None = None, job: str | None = None) -> dict:
    """Join RUN_DIR/NODE.json into RUN_DIR/fleet.json (RUN_DIR: REPORT_DIR/job-JOB); the nodes are --hosts, else
    those the login node asked for (slurm-run.json) when this job ran on them, else this job's nodes.  The newest
    job's fleet.json is also REPORT_DIR/fleet.json."""
    fr = fleet_report_module()
    job = job or os.environ.get("SLURM_JOB_ID")
    run = _read_run(report_dir, job)
    job = job or run.get("job")
    folder = run_dir(report_dir, job)
    mine = job_nodes()
    if not hosts:
        asked = run.get("nodes", [])
        hosts = asked if asked and set(mine) <= set(asked) else mine
    if not hosts:
        raise UsageError("which nodes? no --hosts, no " + RUN_FILE + " and not inside a Slurm job",
                         fix="Pass --hosts node1,node2,… (the nodes the fleet job ran on).")
    not_started = run.get("not_started", {})
    missing = {n: ("not-started", f"Slurm did not start it: {why}") for n, why in not_started.items()}
    for n in hosts:  # a node of the job with no report: Slurm ran no task there, or it died before writing one
        missing.setdefault(n, ("failed", "no report: Slurm ran no task there"
                               + (f" (job {job}; see {report_dir}/slurm-{job}.out)" if job else "")))
    fleet = fr.build(folder, hosts, missing)
    fleet.update(slurm_job=job, report_dir=str(folder), written_at=_now(), lorastrap_version=_version())
    _write_json(folder / FLEET_FILE, fleet)
    _publish(report_dir, folder, fleet)
    return fleet


def _version() -> str:
    from lorastrap import __version__
    return __version__


def _publish(report_dir: Path, folder: Path, fleet: dict) -> None:
    """REPORT_DIR/fleet.json: the newest job's fleet report (an older job that ends later does not replace it)."""
    from lorastrap.core import locks
    if folder == report_dir:
        return
    with locks.held(report_dir / ".fleet-json.lock", what=f"{report_dir / FLEET_FILE}"):
        try:
            current = json.loads((report_dir / FLEET_FILE).read_text()).get("slurm_job")
        except (OSError, ValueError):
            current = None
        job = fleet.get("slurm_job")
        if current and job and str(current).isdigit() and str(job).isdigit() and int(current) > int(job):
            return
        _write_json(report_dir / FLEET_FILE, fleet)


def report_command(report_dir: Path, hosts: list[str] | None) -> tuple[dict, int]:
    """`lorastrap fleet report`: the report, and the exit code.  Inside the job (its last step) the code counts
    only the nodes the job ran on: a drained node does not make the job FAILED, a failed node does."""
    fleet = report(report_dir, hosts)
    return fleet, exit_code(fleet, started_only=bool(os.environ.get("SLURM_JOB_ID")))


def format_fleet(fleet: dict) -> str:
    fr = fleet_report_module()
    head = " · ".join(x for x in (f"job {fleet['slurm_job']}" if fleet.get("slurm_job") else "",
                                  f"lorastrap {fleet.get('lorastrap_version') or '?'}", fleet.get("written_at") or "",
                                  f"reports in {fleet['report_dir']}" if fleet.get("report_dir") else "") if x)
    text = head + "\n" + fr.table(fleet["hosts"]) + "\n" + fr.summary_line(fleet)
    if fleet.get("interrupted"):
        text += "\n" + fleet["interrupted"]
    return text


def exit_code(fleet: dict, started_only: bool = False) -> int:
    if fleet.get("interrupted"):
        return INTERRUPTED
    skip = {"ok", "not-started"} if started_only else {"ok"}
    return 0 if all(r["status"] in skip for r in fleet["hosts"]) else FLEET_INCOMPLETE


# --------------------------------------------------------------------------------------------------------------
# The login node

def default_partition() -> str:
    """The partition sbatch uses when none is named (sinfo marks it with a "*")."""
    res = _slurm(["sinfo", "-h", "-o", "%P"])
    marked = [p.strip()[:-1] for p in res.stdout.splitlines() if p.strip().endswith("*")]
    if not res.ok or not marked:
        raise UsageError("Slurm names no default partition" + (f": {res.tail()}" if not res.ok else ""),
                         fix="Pass --partition (`sinfo -s` lists them).")
    return marked[0]


def sinfo(partition: str | None, nodelist: str | None) -> list[tuple[str, str, str]]:
    """(node, long state, reason) for the partition's (or the listed) nodes, each once, sorted."""
    argv = ["sinfo", "-h", "-N", "-o", "%N|%T|%E"]
    if partition:
        argv += ["-p", partition]
    if nodelist:
        argv += ["-n", nodelist]
    res = _slurm(argv)
    if not res.ok:
        raise ConfigError("Slurm could not list the nodes: " + " ".join(argv), why=res.tail(),
                          fix="Check --partition and --nodelist (`sinfo -N` lists them), and that slurmctld is up.")
    nodes: dict[str, tuple[str, str, str]] = {}
    for line in res.stdout.splitlines():
        name, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if name:
            nodes.setdefault(name, (name, state, reason))
    return [nodes[n] for n in sorted(nodes)]


def job_state(job: str) -> tuple[str, str]:
    """The job's state (COMPLETED, RUNNING, …; GONE once slurmctld has forgotten it) and exit code ("13:0")."""
    res = _slurm(["scontrol", "show", "job", "-o", job])
    if not res.ok:  # forgotten, or slurmctld did not answer this time (then: ask again)
        return ("GONE" if "invalid job id" in (res.stderr + res.stdout).lower() else "UNANSWERED"), "?"
    fields = dict(f.split("=", 1) for f in res.stdout.split() if "=" in f)
    return fields.get("JobState", "UNANSWERED"), fields.get("ExitCode", "?")


class _Stopped(Exception):
    """The login node was told to stop: signal name, and whether the job is cancelled."""

    def __init__(self, signame: str, cancel: bool):
        super().__init__(signame)
        self.signame, self.cancel = signame, cancel


@contextmanager
def _login_signals():
    """SIGTERM stops the wait and cancels the job (as Ctrl-C does); SIGHUP (the ssh session dropped) stops the wait
    and leaves the job running: it writes its own report."""
    def on(signum, frame):
        raise _Stopped(signal.Signals(signum).name, cancel=signum == signal.SIGTERM)
    with signals.handled((signal.SIGTERM, signal.SIGHUP), on):
        yield


def wait(job: str, narrate=lambda m: None) -> str:
    """Wait until the job ended (polling: 0.25 s apart at first, a tenth of the time waited later, 15 s at most)."""
    t0, last = time.monotonic(), None
    while True:
        state, code = job_state(job)
        if state in ENDED or state == "GONE":
            return f"{state}, exit code {code}"
        if state != last:
            narrate(f"job {job}: {state.lower()}")
            last = state
        time.sleep(min(0.25 + (time.monotonic() - t0) / 10, 15.0))


def _cancel(job: str, why: str, narrate) -> str:
    """Cancel the job and wait (a little) for its end, so that the reports of the nodes that finished are in."""
    narrate(f"{why}: cancelling job {job}")
    _slurm(["scancel", job])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state, _ = job_state(job)
        if state in ENDED or state == "GONE":
            return state
        time.sleep(0.5)
    return "CANCELLING"


def startable(state: str) -> bool:
    return not state.endswith("*") and state.rstrip("~#!%$@^-+") in STARTABLE


def slurm(opts: NodeOptions, *, partition: str | None = None, nodelist: str | None = None,
          time_limit: str | None = None, sbatch_args: list[str] = (), lorastrap_cmd: str | None = None,
          narrate=lambda m: None) -> dict:
    """Provision the partition's nodes through one batch job; returns the fleet report (also in fleet.json).
    One run at a time per report folder (a lock beside the reports); each job's reports in REPORT_DIR/job-JOB."""
    from lorastrap.core import locks
    from lorastrap.core.errors import BusyError
    check_options(opts)
    opts.report_dir.mkdir(parents=True, exist_ok=True)
    try:
        held = locks.held(opts.report_dir / ".fleet-run.lock", what=f"report folder {opts.report_dir}", wait=False)
        held.__enter__()
    except BusyError as exc:
        raise BusyError(f"another `lorastrap fleet slurm`{exc.what.split('run', 1)[-1]} reports into "
                        f"{opts.report_dir}", why="two runs sharing a report folder would mix their fleet.json",
                        fix="Wait for it to finish, or pass another --report-dir.") from None
    try:
        return _slurm_locked(opts, partition=partition, nodelist=nodelist, time_limit=time_limit,
                             sbatch_args=sbatch_args, lorastrap_cmd=lorastrap_cmd, narrate=narrate)
    finally:
        held.__exit__(None, None, None)


def _slurm_locked(opts: NodeOptions, *, partition, nodelist, time_limit, sbatch_args, lorastrap_cmd,
                  narrate) -> dict:
    partition = partition or default_partition()
    nodes = sinfo(partition, nodelist)
    asked = [n for n, _, _ in nodes]
    if nodelist:
        listed = _slurm(["scontrol", "show", "hostnames", nodelist])
        asked = sorted(set(asked) | set(listed.stdout.split()))
    known = {n for n, _, _ in nodes}
    not_started = {n: f"Slurm knows no node {n} in partition {partition}" for n in asked if n not in known}
    for n, state, reason in nodes:
        if not startable(state):
            not_started[n] = f"node {n} is {state}" + (f" (reason: {reason})" if reason and reason != "none" else "")
    go = [n for n in asked if n not in not_started]
    run = {"schema_version": 1, "nodes": asked, "not_started": not_started, "job": None, "partition": partition}
    _write_json(opts.report_dir / RUN_FILE, run)
    for n, why in sorted(not_started.items()):
        narrate(f"not starting {n}: {why}")
    job, interrupted = None, None
    if go:
        script = paths.DEPLOY / "slurm" / "lorastrap-fleet.sbatch"
        argv = ["sbatch", "--parsable", "--job-name=lorastrap-fleet", f"--nodes={len(go)}",
                f"--nodelist={','.join(go)}", f"--partition={partition}", "--ntasks-per-node=1", "--no-kill",
                f"--output={opts.report_dir}/slurm-%j.out"]
        argv += [f"--time={time_limit}"] if time_limit else []
        argv += [*sbatch_args, str(script), *opts.argv()]
        command = lorastrap_cmd or f"{shlex.quote(sys.executable)} -m lorastrap"
        narrate(f"submitting one lorastrap task on each of {len(go)} node(s): {', '.join(go)}")
        with _login_signals():
            res = _slurm(argv, env=subproc.clean_env(LORASTRAP=command))
            job = (res.stdout.strip().splitlines() or [""])[0].split(";")[0]
            if not res.ok or not job.isdigit():
                raise UsageError("Slurm refused the fleet job: " + " ".join(argv[:9]) + " …", why=res.tail(),
                                 fix="Check --partition, --nodelist and the sbatch options (`sinfo -N` lists them).")
            run["job"] = job
            run_dir(opts.report_dir, job).mkdir(parents=True, exist_ok=True)
            _write_json(run_dir(opts.report_dir, job) / RUN_FILE, run)
            _write_json(opts.report_dir / RUN_FILE, run)
            where = run_dir(opts.report_dir, job) / FLEET_FILE
            narrate(f"job {job} submitted; its reports go to {run_dir(opts.report_dir, job)} (Ctrl-C or SIGTERM "
                    f"cancels it; if this session ends, the job goes on and writes {where} itself)")
            try:
                state = wait(job, narrate)
                narrate(f"job {job} ended: {state}")
            except KeyboardInterrupt:
                state = _cancel(job, "interrupted (Ctrl-C)", narrate)
                interrupted = f"interrupted: job {job} was cancelled ({state}); the table shows what had finished"
            except _Stopped as stop:
                if not stop.cancel:
                    narrate(f"{stop.signame}: no longer waiting; job {job} keeps running and writes {where} "
                            f"(and {opts.report_dir / FLEET_FILE}) when it ends; `scancel {job}` stops it")
                    raise LorastrapError(f"stopped by {stop.signame}: job {job} keeps running",
                                         why="the login session ended (or was told to hang up)",
                                         fix=f"Its report will be {where}; `lorastrap fleet report --report-dir "
                                             f"{opts.report_dir} --hosts {','.join(asked)}` prints it, "
                                             f"`scancel {job}` stops it.", exit_code=INTERRUPTED) from None
                state = _cancel(job, f"stopped by {stop.signame}", narrate)
                interrupted = (f"stopped by {stop.signame}: job {job} was cancelled ({state}); the table shows what "
                               f"had finished")
    fleet = report(opts.report_dir, asked, job=job)
    if interrupted:
        fleet["interrupted"] = interrupted
        folder = run_dir(opts.report_dir, job)
        _write_json(folder / FLEET_FILE, fleet)
        _publish(opts.report_dir, folder, fleet)
    return fleet


def bundle_paths(values: list[str] | None) -> list[Path]:
    return [Path(v).expanduser().absolute() for v in values or []]

