"""A real single-node Slurm for the launch tests: Debian's slurm-wlm packages, munge, slurmctld and
slurmd on localhost, stopped by PID.

`start()` returns None when this machine cannot run one (not root, no apt), with the reason in
`SKIP_REASON`, so the tests skip and say why. A Slurm that is already up (sinfo answers) is used as
it is and left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SKIP_REASON = ""
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PID_FILES = ["/run/slurmd.pid", "/run/slurmctld.pid", "/run/munge/munged.pid"]  # stop order


def _conf() -> str:
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    return f"""ClusterName=kscaletest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire + 1 s before they may start again (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
InactiveLimit=0
KillWait=5
MinJobAge=600
Waittime=0
NodeName=localhost CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def slurm_up() -> bool:
    return shutil.which("sinfo") is not None and _run(["sinfo", "-h", "-o", "%t"], timeout=10).stdout.strip() in (
        "idle",
        "mix",
        "alloc",
    )


def _install() -> str:
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return ""
    if shutil.which("apt-get") is None:
        return "no apt-get to install Debian's slurm packages"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    up = _run(["apt-get", "update", "-qq"], env=env, timeout=300)
    got = _run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, timeout=600)
    if got.returncode:
        return f"apt-get install {' '.join(PACKAGES)} failed: {(got.stderr or up.stderr).strip()[-300:]}"
    return ""


def start() -> bool:
    """True when a Slurm controller and node are up (started here or already running)."""
    global SKIP_REASON
    if slurm_up():
        return True
    if os.geteuid() != 0:
        SKIP_REASON = "Slurm tests need root to install and start slurm-wlm (not root here)"
        return False
    reason = _install()
    if reason:
        SKIP_REASON = reason
        return False
    Path("/etc/slurm").mkdir(exist_ok=True)
    Path("/etc/slurm/slurm.conf").write_text(_conf())
    for d in ("/var/log/slurm", "/var/lib/slurm/slurmctld", "/var/lib/slurm/slurmd", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    os.chmod("/run/munge", 0o755)
    steps = [["runuser", "-u", "munge", "--", "/usr/sbin/munged"], ["slurmctld", "-i"], ["slurmd", "-N", "localhost"]]
    for cmd in steps:
        out = _run(cmd, timeout=60)
        if out.returncode:
            SKIP_REASON = f"{' '.join(cmd)} failed: {out.stderr.strip()[-300:]}"
            stop()
            return False
    deadline = time.time() + 60
    while time.time() < deadline:
        if slurm_up():
            return True
        time.sleep(0.5)
    SKIP_REASON = "slurmd did not register with slurmctld within 60 s (see /var/log/slurm/)"
    stop()
    return False


def stop() -> None:
    for pid_file in PID_FILES:
        p = Path(pid_file)
        if not p.is_file():
            continue
        try:
            pid = int(p.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (ValueError, ProcessLookupError):
            pass
