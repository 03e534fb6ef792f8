"""Starting and stopping the local processes of a job: one per rank, as torchrun would, for `kscale train`
and the offline converters (offline.py).

Each rank leads its own process group (so stopping a rank also stops what it started: megatron's
checkpoint writer starts a multiprocessing Manager that would otherwise outlive a killed rank), and dies
with its launcher: the kernel sends it PARENT_DEATH_SIGNAL when the launcher dies, even by SIGKILL
(prctl PR_SET_PDEATHSIG, set between fork and exec); a rank that calls `watch_launcher` then kills its
whole process group, and a rank that has not yet (still starting) dies of the signal's default action.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

from ..distributed import free_port

LAUNCHER_PID_ENV = "KSCALE_LAUNCHER_PID"  # set in every rank: the launcher holds the run's lock
PR_SET_PDEATHSIG = 1
# a real-time signal nothing else in the stack uses (USR1/USR2 may be a preemption signal)
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 1 if sys.platform.startswith("linux") else None

_prctl = None


def _parent_death_hook(parent: int):
    """The preexec_fn of a rank: ask for PARENT_DEATH_SIGNAL when the launcher dies; if it already died
    (between fork and here), exit now."""
    global _prctl
    if PARENT_DEATH_SIGNAL is None:
        return None
    if _prctl is None:  # loaded in the parent: the child only calls it
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl, sig = _prctl, int(PARENT_DEATH_SIGNAL)

    def hook():
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


def start_ranks(module: str, args: list[str], n: int, hold_signals=(), **popen) -> list[subprocess.Popen]:
    """`python -m module *args` once per rank, with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* set. The
    ranks start with `hold_signals` blocked (the mask is inherited across exec): one that arrives while a
    rank is starting stays pending until the rank installs its handlers and unblocks them
    (train/preemption.py) instead of killing it half-started; the launcher's own handlers get them once
    the ranks are started."""
    # share the cores: more OpenMP threads than cores across ranks stalls everything on small machines
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
        "OMP_NUM_THREADS": threads,
        LAUNCHER_PID_ENV: str(os.getpid()),
    }
    hook = _parent_death_hook(os.getpid())
    blocked = _block(hold_signals) if hold_signals else set()
    procs: list[subprocess.Popen] = []
    try:
        for r in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    start_new_session=True,
                    preexec_fn=hook,
                    **popen,
                )
            )
    except BaseException:
        signal_ranks(procs, signal.SIGKILL)
        raise
    finally:
        _unblock(blocked)
    return procs


def _block(sigs) -> set:
    """Block `sigs` in this thread; returns those that were not blocked before (to unblock after)."""
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError):
        return set()
    return set(sigs) - set(before)


def _unblock(sigs) -> None:
    if sigs:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def signal_ranks(procs: list[subprocess.Popen], sig=signal.SIGTERM) -> None:
    """`sig` to every rank's process group (the rank and whatever it started)."""
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def signal_rank_processes(procs: list[subprocess.Popen], sig) -> None:
    """`sig` to every rank still running, not to what it started (a rank's Manager must live while the
    rank saves its checkpoint)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass


def kill_own_group() -> None:
    """SIGKILL to this rank's process group: itself and everything it started. A process that does not lead
    its own group (not started by start_ranks) kills only itself."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def watch_launcher(poll_s: float = 0.5) -> None:
    """In a rank started by start_ranks: when the launcher dies (PARENT_DEATH_SIGNAL, or a watchdog thread
    that sees this process re-parented, for a main thread stuck in C code), kill this rank's process group.
    No-op in a process started otherwise (srun, torchrun)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return
    launcher_pid = int(launcher)
    if PARENT_DEATH_SIGNAL is not None:
        signal.signal(PARENT_DEATH_SIGNAL, lambda signum, frame: kill_own_group())
    if os.getppid() != launcher_pid:
        kill_own_group()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != launcher_pid:
                kill_own_group()

    threading.Thread(target=watch, name="kscale-launcher-watch", daemon=True).start()
