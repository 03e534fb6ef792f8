"""Points of the training loop and the checkpoint writer where a fault can be injected. `TrainHooks`
does nothing; production code always runs with it. The resume, NaN and signal tests start real
`kscale train` processes and ask for faults through KSCALE_FAULT_* variables: `from_environment` is the
only code that reads them.
"""

from __future__ import annotations

import os
import time


class TrainHooks:
    """No faults. Steps are counted from 1 (the step being computed or just completed)."""

    def poison_loss(self, step: int) -> bool:
        """Make the loss of `step` NaN (tests the run.on_nan policy)."""
        return False

    def after_step(self, step: int) -> None:
        """After `step` is logged, evaluated and checkpointed."""

    def before_commit(self, step: int) -> None:
        """Inside the save of `step`: every file is written, nothing renamed yet."""


class FaultInjection(TrainHooks):
    def __init__(
        self,
        *,
        exit_after_step: int | None = None,
        crash_in_checkpoint: int | None = None,
        nan_at_step: int | None = None,
        step_sleep_s: float = 0.0,
    ):
        self.exit_after_step, self.crash_in_checkpoint = exit_after_step, crash_in_checkpoint
        self.nan_at_step, self.step_sleep_s = nan_at_step, step_sleep_s

    def poison_loss(self, step: int) -> bool:
        return step == self.nan_at_step

    def after_step(self, step: int) -> None:
        if step == self.exit_after_step:
            os._exit(137)  # as a SIGKILL would: no cleanup, no checkpoint
        time.sleep(self.step_sleep_s)  # slow steps, so a signal test can hit a run mid-way

    def before_commit(self, step: int) -> None:
        if step == self.crash_in_checkpoint:
            os._exit(137)


def from_environment() -> TrainHooks:
    """FaultInjection when a KSCALE_FAULT_* variable is set, else the no-op hooks."""

    def num(name, kind):
        value = os.environ.get(f"KSCALE_FAULT_{name}")
        return kind(value) if value not in (None, "") else None

    faults = dict(
        exit_after_step=num("EXIT_AFTER_STEP", int),
        crash_in_checkpoint=num("CRASH_IN_CHECKPOINT", int),
        nan_at_step=num("NAN_AT_STEP", int),
        step_sleep_s=num("STEP_SLEEP_S", float) or 0.0,
    )
    if not any(faults.values()):
        return TrainHooks()
    return FaultInjection(**faults)
