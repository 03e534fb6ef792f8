"""The training loop, the same for both engines (docs/design.md §4).

config -> model inputs -> engine (model + optimizer on this rank) -> this DP rank's loaders -> resume ->
steps: learning rate, forward/backward of every micro-batch, NaN policy, update, record -> log,
evaluate, checkpoint, fault hooks, preemption check. The engine (engine.py) does the model's work; this
module decides when.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, preemption, run_dir
from .engine import Engine, build_engine
from .hooks import TrainHooks
from .inputs import ModelInputs, build_loaders, check_train_data, endless, fixed_batches, model_inputs
from .metrics import MetricsWriter
from .nan_policy import all_finite, skip_nonfinite_step
from .records import step_record
from .schedule import learning_rate


def set_determinism(cfg: DictConfig) -> str:
    """run.deterministic: torch's deterministic algorithms, which also select the Kronecker embedding's
    deterministic backward (sorted, fixed-order sums instead of atomics) unless
    model.deterministic_embedding says otherwise. Returns the line the log shows."""
    if not cfg.run.deterministic:
        return "deterministic: off (atomic embedding backward; run.deterministic=true for bitwise repeatable runs)"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.use_deterministic_algorithms(True)
    return "deterministic: on (torch.use_deterministic_algorithms(True), deterministic embedding backward)"


class TrainingRun:
    """One rank's run: built collectively by every rank, then `run()` trains to schedule.train_steps."""

    def __init__(self, cfg: DictConfig, hooks: TrainHooks | None = None, console=print):
        self.cfg, self.hooks = cfg, hooks or TrainHooks()
        self.ckpt_dir = Path(cfg.run.dir) / "checkpoints"
        self.inputs, tok = model_inputs(cfg)
        seq_len = self.inputs.model_cfg.seq_len
        check_train_data(cfg, tok, seq_len)
        determinism = set_determinism(cfg)
        self.engine: Engine = build_engine(cfg, self.inputs)
        self.console = console if self.engine.is_logger or torch.distributed.get_rank() == 0 else _silent
        if torch.distributed.get_rank() == 0:
            console(determinism)
        self.train_loader, self.val_loader = build_loaders(cfg, tok, seq_len, self.engine.dp_rank, self.engine.dp_size)
        self.val_batches: list | None = None
        self.tokens_per_step = cfg.data.global_batch_size * seq_len
        self.step = self.tokens = self.skipped = 0
        self.lineage, self.resumed_from = "", ""
        self.wandb_run_id: str | None = None  # kept in the run state: a resumed run continues its W&B run

    def run(self) -> dict:
        cfg, engine = self.cfg, self.engine
        self._resume()
        self.metrics = MetricsWriter.for_run(
            cfg, engine.is_logger, self.console, resume_step=self.step, wandb_run_id=self.wandb_run_id
        )
        self.wandb_run_id = self.metrics.wandb_run_id
        batches = endless(self.train_loader)
        while self.step < cfg.schedule.train_steps:
            t0 = time.perf_counter()
            lr = learning_rate(self.step, cfg)
            engine.set_learning_rate(lr)
            loss, have_loss = engine.forward_backward(batches, poison=self.hooks.poison_loss(self.step + 1))
            finite = all_finite(loss, have_loss)
            if not finite:
                self.skipped = skip_nonfinite_step(cfg, self.step + 1, self.skipped)  # raises under on_nan=stop
            grad_norm = engine.optimizer_step(finite)
            self.step += 1
            self.tokens += self.tokens_per_step
            record = step_record(
                cfg,
                step=self.step,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens=self.tokens,
                tokens_per_step=self.tokens_per_step,
                step_time=time.perf_counter() - t0,
                skipped=self.skipped,
                n_params=engine.n_params,
                flops_per_token=getattr(engine, "flops_per_token", None),
            )
            self._finish_step(record)
        self.metrics.close()
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped}

    def _resume(self) -> None:
        path = run_dir.prepare(self.cfg, self.ckpt_dir, self.console)
        if path is None:
            self.lineage = run_dir.new_lineage()
            return
        state = checkpoint.load(path, self.engine.read_checkpoint)
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped_steps"]
        self.lineage = state.get("lineage") or run_dir.new_lineage()
        self.wandb_run_id = state.get("wandb_run_id")
        self.resumed_from = path.name
        self.train_loader.load_state_dict(state["train_loader"])
        self.console(
            f"resumed from {path} at step {self.step}"
            + ("" if state.get("rng_restored") else " (new world size: RNG states re-seeded)")
        )
        saved_cfg = OmegaConf.load(path / "config.yaml")
        for change in run_dir.resume_changes(saved_cfg, self.cfg):
            self.console(f"changed on resume, applies from step {self.step + 1}: {change}")

    def _finish_step(self, record: dict) -> None:
        """In order: log (with the norm statistics, a collective, only when logged), evaluate, checkpoint,
        the fault hooks, then the preemption check (a collective: every rank stops at the same step,
        after saving unless this step was just saved)."""
        cfg, step = self.cfg, self.step
        last = step == cfg.schedule.train_steps
        if step % cfg.logging.every == 0 or last:
            record.update(self.engine.norm_stats())
            self.metrics.write(record)
        if cfg.eval.every and (step % cfg.eval.every == 0 or last):
            val = self._evaluate()
            if val is not None:
                self.metrics.write(
                    {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50)), "tokens": self.tokens}
                )
        saved = False
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_at_end):
            self.save()
            saved = True
        self.hooks.after_step(step)
        signame = preemption.requested()
        if signame and not last:
            if not saved:
                self.save()
            self.metrics.close()
            raise preemption.Preempted(step, signame)

    def _evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        if self.val_batches is None:
            self.val_batches = fixed_batches(self.val_loader, self.cfg.eval.batches)
        return self.engine.evaluate(self.val_batches) if self.val_batches else None

    def save(self) -> Path:
        """Collective: the checkpoint of the current step."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": self.skipped,
            "train_loader": self.train_loader.state_dict(),
            "world_size": torch.distributed.get_world_size(),
            "lineage": self.lineage,
            **self.engine.run_state(),
        }
        state["wandb_run_id"] = self.wandb_run_id
        return save_checkpoint(
            self.engine,
            self.cfg,
            self.inputs,
            self.ckpt_dir,
            state,
            keep_last=self.cfg.checkpoint.keep_last,
            before_commit=self.hooks.before_commit,
            protect=(self.resumed_from,),
        )


def save_checkpoint(
    engine: Engine,
    cfg: DictConfig,
    inputs: ModelInputs,
    root: Path,
    state: dict,
    *,
    keep_last: int,
    before_commit=None,
    protect: tuple[str, ...] = (),
) -> Path:
    """Collective: the engine's model and optimizer plus the run state (`state`, the config, the byte
    table) as root/step_XXXXXXXX; used by the loop and the offline converters."""
    return checkpoint.save(
        root,
        state["step"],
        engine.write_checkpoint,
        state,
        OmegaConf.to_yaml(cfg),
        inputs.byte_table,
        keep_last=keep_last,
        before_commit=before_commit,
        protect=protect,
    )


def _silent(*args, **kwargs) -> None:
    pass
