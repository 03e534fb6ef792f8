"""The contract between the training loop (loop.py) and an engine (megatron_engine.py, deepspeed_engine.py).

An engine owns a model, its optimizer and their checkpoint format on this rank; the loop owns
everything else (schedule, data, NaN policy, metrics, evaluation, checkpoint cadence, preemption).
Methods marked collective must be called by every rank of the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from .inputs import ModelInputs


class Engine(Protocol):
    n_params: int  # parameters of this rank's model
    flops_per_token: int  # training FLOPs per token of the whole model (records.model_flops_per_token: MFU)
    dp_rank: int  # data-parallel rank and size: which samples this rank reads
    dp_size: int
    is_logger: bool  # the rank that sees the global loss and writes metrics

    def set_learning_rate(self, lr: float) -> None: ...

    def forward_backward(self, batches: Iterator[dict], poison: bool = False) -> tuple[float, bool]:
        """Collective. Forward and backward of every micro-batch of one step (gradients accumulated, no
        update). Returns (mean loss over the global batch, whether this rank has it: the last PP stage).
        `poison` makes the loss NaN (fault injection)."""
        ...

    def optimizer_step(self, finite: bool) -> float:
        """Collective. Apply the update (or skip it when the loss was not finite); the gradient norm, NaN
        when skipped."""
        ...

    def evaluate(self, batches: list[dict]) -> float | None:
        """Collective. Mean loss over the batches, no gradients; None on ranks without a loss."""
        ...

    def norm_stats(self) -> dict:
        """Collective. The input layer's norm-drift statistics (records.norm_record) on the logging rank."""
        ...

    def write_checkpoint(self, folder: Path) -> None:
        """Collective. Model and optimizer into a fresh checkpoint folder (checkpoint.save adds the run state)."""
        ...

    def read_checkpoint(self, folder: Path, load_optimizer: bool = True) -> None:
        """Collective. Model (and optimizer) from a checkpoint folder this engine wrote."""
        ...

    def run_state(self) -> dict:
        """What the engine adds to the trainer state of a checkpoint (its name, ...)."""
        ...

    def full_state(self) -> dict:
        """Collective. {"tensors": {param name: {"param", "exp_avg", "exp_avg_sq"} whole fp32 CPU tensors},
        "adam_step": int}: the engine-neutral form the engine converter moves between formats."""
        ...

    def set_full_state(self, state: dict) -> None:
        """Collective. The inverse of full_state (the Adam states must exist: take one zero-LR step first)."""
        ...


def build_engine(cfg: DictConfig, inputs: ModelInputs) -> Engine:
    """The engine run.engine names, built on this rank (model parallel state, seeding, model, optimizer).
    DeepSpeed is imported only when it is used."""
    if cfg.run.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, inputs)
    from .megatron_engine import MegatronEngine

    return MegatronEngine(cfg, inputs)
