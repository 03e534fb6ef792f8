"""What a step with a non-finite loss does (`run.on_nan`): stop with an error, or skip the update and
count it, up to `run.max_skipped_steps`. Every rank decides alike."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from ..distributed import device
from ..errors import KScaleError


def all_finite(loss: float, have_loss: bool = True) -> bool:
    """Collective: every rank decides alike (ranks without a loss, e.g. early PP stages, vote finite)."""
    finite = torch.tensor([1.0 if (not have_loss or math.isfinite(loss)) else 0.0], device=device())
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.item() != 0


def skip_nonfinite_step(cfg: DictConfig, step: int, skipped: int) -> int:
    """The policy for step `step`, whose loss is not finite: raises under on_nan=stop (or past the
    allowed number of skips); otherwise returns the new count of skipped steps."""
    if cfg.run.on_nan == "stop":
        raise KScaleError(
            f"loss is not finite at step {step}",
            where=f"{cfg.run.dir}",
            fix="lower optim.lr, check the data, or set run.on_nan=skip",
        )
    skipped += 1
    if skipped > cfg.run.max_skipped_steps:
        raise KScaleError(f"{skipped} steps with a non-finite loss", fix="lower optim.lr")
    return skipped
