"""A real Slurm cluster on this machine: slurmctld in a hub network namespace, one slurmd per node namespace.

Debian's slurm-wlm 22.05 and munge (.ci/run installs them; installing starts no daemon).  One munged serves every
daemon and client through its socket file; the configuration is the minimum a cluster without cgroups and without
accounting needs (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none).  Each slurmd runs in its own network
and UTS namespace (its hostname is its node name), entered with nsenter: `ip netns exec` remounts /sys, which hides
/sys/fs/cgroup from slurmd.  Everything started here is stopped, and the namespaces removed, on the way out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import netns_fleet

DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")


def unavailable() -> str | None:
    """Why a Slurm cluster cannot run here, or None."""
    why = netns_fleet.unavailable_namespaces()
    if why:
        return why
    for path in DAEMONS:
        if not Path(path).exists():
            return f"needs {path} (Debian slurm-wlm and munge; .ci/run installs them)"
    for tool in ("sbatch", "srun", "sinfo", "scontrol"):
        if not shutil.which(tool):
            return f"needs {tool} (Debian slurm-client)"
    return None


def _conf(work: Path, names: list[str], nodes: list[tuple[str, str]],
          partitions: dict[str, list[str]] | None = None) -> Path:
    lines = [
        "ClusterName=lorastrap-test",
        f"SlurmctldHost=ctl({netns_fleet.SUBNET}.1)",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={work / 'munge.sock'}",
        "CredType=cred/munge",
        f"StateSaveLocation={work / 'ctld-state'}",
        f"SlurmdSpoolDir={work / 'spool'}/%n",
        f"SlurmctldPidFile={work / 'slurmctld.pid'}",
        f"SlurmdPidFile={work / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={work / 'slurmctld.log'}",
        f"SlurmdLogFile={work / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SwitchType=switch/none", "MpiDefault=none", "LaunchParameters=use_interactive_step",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin", "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "MessageTimeout=10", "InactiveLimit=0",
        "MinJobAge=300", "KillWait=5", "Waittime=0", "MailProg=/bin/true",
    ]
    for name, (_, addr) in zip(names, nodes):
        lines.append(f"NodeName={name} NodeAddr={addr} CPUs=1 RealMemory=1000 State=UNKNOWN")
    for i, (part, members) in enumerate((partitions or {"lora": names}).items()):
        lines.append(f"PartitionName={part} Nodes={','.join(members)} Default={'YES' if i == 0 else 'NO'} "
                     "MaxTime=INFINITE State=UP")
    conf = work / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _wait_idle(env: dict, names: list[str], hub: str, work: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run(["ip", "netns", "exec", hub, "sinfo", "-h", "-N", "-o", "%N %T"], env=env,
                             capture_output=True, text=True)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        if all(states.get(n) == "idle" for n in names):
            return
        if time.monotonic() > deadline:
            logs = "".join((work / f"slurmd-{n}.log").read_text()[-400:] for n in names
                           if (work / f"slurmd-{n}.log").exists())
            raise RuntimeError(f"slurm nodes not idle: {states} {res.stderr}\n{logs}"
                               f"{(work / 'slurmctld.log').read_text()[-1500:]}")
        time.sleep(0.2)


@contextmanager
def cluster(n: int, work: Path, partitions: dict[str, list[str]] | None = None):
    """n Slurm nodes (named sn0…) in partition "lora" (or in PARTITIONS: name → its nodes, the first the default).
    Yields (hub namespace, node names, env for the clients: SLURM_CONF set; run the clients inside the hub
    namespace)."""
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # munged wants its socket's folder reachable by all
    names = [f"sn{i}" for i in range(n)]
    procs: list[subprocess.Popen] = []
    key = work / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for d in ("ctld-state", "spool"):
        (work / d).mkdir(exist_ok=True)
    env = dict(os.environ, SLURM_CONF=str(work / "slurm.conf"))
    try:
        procs.append(subprocess.Popen(
            ["/usr/sbin/munged", "-F", "-f", f"--socket={work / 'munge.sock'}", f"--key-file={key}",
             f"--log-file={work / 'munged.log'}", f"--pid-file={work / 'munged.pid'}",
             f"--seed-file={work / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        with netns_fleet.network(n, prefix="sl") as (hub, nodes):
            conf = _conf(work, names, nodes, partitions)
            deadline = time.monotonic() + 10
            while not (work / "munge.sock").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("munged did not start")
                time.sleep(0.05)
            # slurmctld runs only on a host named as SlurmctldHost: its own UTS namespace, hostname "ctl".
            procs.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{hub}", "unshare", "--uts", "sh", "-c",
                                           f"hostname ctl && exec /usr/sbin/slurmctld -D -i -f {conf}"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(work / "slurmctld.err", "w"),
                                          start_new_session=True))
            for name, (ns, _) in zip(names, nodes):
                procs.append(subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "sh", "-c",
                     f"hostname {name} && exec /usr/sbin/slurmd -D -N {name} -f {conf}"],
                    env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"slurmd-{name}.err", "w"),
                    start_new_session=True))
            try:
                _wait_idle(env, names, hub, work)
                yield hub, names, env
            finally:
                netns_fleet.stop(procs)
    finally:
        netns_fleet.stop(procs)
