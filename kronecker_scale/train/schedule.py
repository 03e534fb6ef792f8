"""The learning-rate schedule: linear warmup, then cosine or linear decay to min_lr, or constant."""

from __future__ import annotations

import math

from omegaconf import DictConfig


def learning_rate(step: int, cfg: DictConfig) -> float:
    """The learning rate of the update after `step` completed steps; a pure function of the step, so a
    resumed run follows the uninterrupted run's schedule."""
    s, o = cfg.schedule, cfg.optim
    if s.warmup_steps and step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    total = max((s.decay_steps or s.train_steps) - s.warmup_steps, 1)
    progress = min(max(step - s.warmup_steps, 0) / total, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
    return o.min_lr + (o.lr - o.min_lr) * shape
