"""Preemption and time limits: Slurm sends a signal (USR2 by default, `--signal=USR2@90`) some time
before it stops a job. The handler only sets a flag; the training loop checks it at step boundaries,
all ranks agree (one all-reduce), save a checkpoint together, and leave with `Preempted`. Whoever
launched the ranks then requeues the job (launch/slurm.py), and the requeued job resumes from `latest`.
"""
from __future__ import annotations

import os
import signal

import torch

_flag = {"signal": None}


class Preempted(Exception):
    """Raised by the training loop after the checkpoint at `step` is complete on every rank."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"preempted by {signame}: checkpoint saved at step {step}")
        self.step, self.signame = step, signame


def preempt_signal() -> signal.Signals:
    # the same variable submitit reads, so the sbatch --signal and our handler always agree
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def install_handler() -> None:
    """Call once per rank, in the main thread, before training (replaces submitit's own handler,
    which would requeue before our ranks had saved)."""
    def handler(signum, frame):
        _flag["signal"] = signal.Signals(signum).name
    signal.signal(preempt_signal(), handler)
    _flag["signal"] = None


def requested() -> str | None:
    """The name of the signal if any rank received one (a collective: every rank must call it)."""
    got = torch.tensor([1.0 if _flag["signal"] else 0.0],
                       device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(got, op=torch.distributed.ReduceOp.MAX)
    return (_flag["signal"] or preempt_signal().name) if got.item() > 0 else None
