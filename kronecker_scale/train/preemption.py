"""Signals that end a run early with a checkpoint: preemption and stop requests.

- Preemption and time limits: Slurm sends a signal (USR2 by default, `--signal=USR2@90`) some time
  before it stops a job. The ranks save and leave with `Preempted`; whoever launched them then requeues
  the job (launch/slurm.py, slurm/train.sbatch: exit status 3), and the requeued job resumes from `latest`.
- Stop requests: SIGTERM, SIGINT and SIGHUP (`kill`, `timeout`, systemd, `docker stop`, a cancelled CI
  job, `scancel`, Ctrl-C, a closed terminal) do the same, but the run is not requeued (the launcher
  exits 4, launch/local.py STOPPED_EXIT); running it again resumes from the checkpoint.

The handler only sets a flag; the training loop checks it at every step boundary with one all-reduce
(`requested`), so every rank stops after the same step, saves a checkpoint together and leaves with
`Preempted` (`.stopped` says which kind). Both at once (a stop during a preemption): the stop wins.
A signal that arrives twice, or at every rank and at the launcher, is one request.
"""

from __future__ import annotations

import os
import signal

import torch

_flag: dict = {"signal": None}  # the signal received on this rank (the one that wins, if several)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
    """Raised by the training loop after the checkpoint at `step` is complete on every rank; `stopped` is
    True for a stop request (SIGTERM/SIGINT/SIGHUP: do not requeue), False for the preemption signal."""

    def __init__(self, step: int, signame: str):
        self.step, self.signame = step, signame
        self.stopped = is_stop(signame)
        super().__init__(f"{'stopped' if self.stopped else 'preempted'} by {signame}: checkpoint saved at step {step}")


def preempt_signal() -> signal.Signals:
    # the same variable submitit reads, so the sbatch --signal and our handler always agree
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT and SIGHUP, less the preemption signal if it was set to one of them."""
    return tuple(s for s in STOP_SIGNALS if s != preempt_signal())


def is_stop(signame: str | None) -> bool:
    return signame is not None and signame in {s.name for s in stop_signals()}


def _code(sig: signal.Signals | None) -> int:
    """One number per signal that orders them: stops above the preemption signal (reduced with MAX)."""
    if sig is None:
        return 0
    return (200 if sig in stop_signals() else 100) + int(sig)


def install_handler() -> None:
    """Call once per rank, in the main thread, before training (replaces submitit's own handlers, which
    would requeue before our ranks had saved, and ignore SIGTERM). A local launcher starts its ranks with
    the stop signals blocked (launch/ranks.py), so one sent while the rank was starting waits until here."""

    def handler(signum, frame):
        sig = signal.Signals(signum)
        if _code(sig) > _code(_flag["signal"]):
            _flag["signal"] = sig

    watched = (preempt_signal(), *stop_signals())
    for sig in watched:
        if not ignored(sig):
            signal.signal(sig, handler)
    _flag["signal"] = None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)


def ignored(sig) -> bool:
    """SIGHUP that was ignored when the process started (`nohup`) stays ignored: closing the terminal is
    then not a stop request."""
    return sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN


def received() -> str | None:
    """The name of the signal this rank received, if any (not a collective)."""
    return _flag["signal"].name if _flag["signal"] else None


def requested() -> str | None:
    """The name of the signal if any rank received one (a collective: every rank must call it). Every rank
    gets the same name: a stop request wins over the preemption signal."""
    got = torch.tensor([float(_code(_flag["signal"]))], device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(got, op=torch.distributed.ReduceOp.MAX)
    code = int(got.item())
    return signal.Signals(code % 100).name if code else None
