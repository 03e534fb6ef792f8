"""Starting and stopping the local processes of a job: one per rank, as torchrun would, for `kscale train`
and the offline converters (offline.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from ..distributed import free_port


def start_ranks(module: str, args: list[str], n: int, **popen) -> list[subprocess.Popen]:
    """`python -m module *args` once per rank, with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* set."""
    # share the cores: more OpenMP threads than cores across ranks stalls everything on small machines
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": threads}
    # each rank leads its own process group, so stopping a rank also stops what it spawned (megatron's
    # checkpoint writer starts a multiprocessing Manager that would otherwise outlive a killed rank)
    return [subprocess.Popen([sys.executable, "-m", module, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             start_new_session=True, **popen)
            for r in range(n)]


def signal_ranks(procs: list[subprocess.Popen], sig=signal.SIGTERM) -> None:
    """`sig` to every rank's process group (the rank and whatever it started)."""
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
