"""What both engines (megatron: trainer.py, deepspeed: deepspeed_engine.py) share, so that they train the
same model from the same config and data alike: the learning-rate schedule, the model's inputs (config,
tokenizer, byte table), the data loaders, the non-finite-loss policy, the per-step record, the norm
statistics of the input layer, the fault-injection switches of the tests, and where a resume starts.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import KScaleError
from . import checkpoint, preemption


def learning_rate(step: int, cfg: DictConfig) -> float:
    """Linear warmup, then cosine / linear decay to min_lr, or constant; a pure function of the step."""
    s, o = cfg.schedule, cfg.optim
    if s.warmup_steps and step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    total = max((s.decay_steps or s.train_steps) - s.warmup_steps, 1)
    progress = min(max(step - s.warmup_steps, 0) / total, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
    return o.min_lr + (o.lr - o.min_lr) * shape


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- model inputs and data ---------------------------------------------------------------------------
def model_inputs(cfg: DictConfig):
    """(GPTConfig, tokenizer, byte table or None): what building the model needs besides the layout."""
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    tok = load_tokenizer(tokenizer_path(cfg.tokenizer.path))
    byte_table = None
    if model_cfg.input_layer == "kronecker":
        byte_table = ByteTable.from_tokenizer(tok.path, model_cfg.pos_dim, cfg.tokenizer.byte_source)
    return model_cfg, tok, byte_table


def check_train_data(cfg: DictConfig, tok, model_cfg) -> None:
    from ..data import check_manifest, read_manifest
    for src in cfg.data.train:
        check_manifest(read_manifest(src.path), tokenizer_fingerprint=tok.fingerprint, vocab_size=tok.vocab_size,
                       seq_len=model_cfg.seq_len, where=f"data.train: {src.path}")


def build_loaders(cfg: DictConfig, tok, model_cfg, dp_rank: int, dp_size: int):
    """(train loader, validation loader or None) for this data-parallel rank."""
    from ..data import DataSource, build_loader, read_manifest
    common = dict(micro_batch_size=cfg.data.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                  seed=cfg.data.seed, cache_dir=cfg.data.cache_dir, num_workers=cfg.data.num_workers,
                  tokenizer_fingerprint=tok.fingerprint, seq_len=model_cfg.seq_len)
    train = build_loader([DataSource(s.path, s.proportion) for s in cfg.data.train], "train", **common)
    val_src = cfg.data.val or cfg.data.train[0].path
    val = None
    if read_manifest(val_src)["splits"].get("val", {}).get("samples", 0) >= cfg.data.micro_batch_size:
        val = build_loader([val_src], "val", **{**common, "seed": 0})
    return train, val


def endless(loader):
    while True:                                      # epochs: streaming tracks them in its own state
        yield from loader


def fixed_batches(loader, n: int) -> list:
    """The same held-out batches at every evaluation (each new streaming iteration is a new shuffled
    epoch), read once."""
    return [b for _, b in zip(range(n), loader)]


# --- the loop ----------------------------------------------------------------------------------------
def resume_path(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        return checkpoint.latest_checkpoint(ckpt_dir)
    return Path(cfg.checkpoint.resume)


def saved_at(ckpt_dir: Path, step: int) -> bool:
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    return latest is not None and latest.name == checkpoint.step_dir_name(step)


class Faults:
    """Fault injection for the tests, read from the environment once per run."""

    def __init__(self):
        self.crash_at = int(os.environ.get("KSCALE_FAULT_EXIT_AFTER_STEP", "-1"))
        nan = os.environ.get("KSCALE_FAULT_NAN_AT_STEP")
        self.nan_step = int(nan) if nan is not None else None
        self.step_sleep_s = float(os.environ.get("KSCALE_FAULT_STEP_SLEEP_S", "0"))   # slow steps: signal tests


def all_finite(loss: float, have_loss: bool = True) -> bool:
    """Collective: every rank decides alike (ranks without a loss, e.g. early PP stages, vote finite)."""
    finite = torch.tensor([1.0 if (not have_loss or math.isfinite(loss)) else 0.0], device=device())
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.item() != 0


def skip_nonfinite_step(cfg: DictConfig, step: int, skipped: int) -> int:
    """The run.on_nan policy for a step whose loss is not finite: stop, or skip it and count; returns the
    new count of skipped steps."""
    if cfg.run.on_nan == "stop":
        raise KScaleError(f"loss is not finite at step {step}", where=f"{cfg.run.dir}",
                          fix="lower optim.lr, check the data, or set run.on_nan=skip")
    skipped += 1
    if skipped > cfg.run.max_skipped_steps:
        raise KScaleError(f"{skipped} steps with a non-finite loss", fix="lower optim.lr")
    return skipped


def step_record(cfg: DictConfig, *, step: int, loss: float, lr: float, grad_norm, tokens: int, tokens_per_step: int,
                step_time: float, skipped: int, n_params: int) -> dict:
    record = {"step": step, "loss": loss, "ppl": math.exp(min(loss, 50)), "lr": lr,
              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "tokens": tokens,
              "step_time": step_time, "tokens_per_s": tokens_per_step / step_time, "skipped_steps": skipped}
    if cfg.logging.peak_tflops:
        world = torch.distributed.get_world_size()
        record["mfu"] = 6 * n_params * record["tokens_per_s"] / (cfg.logging.peak_tflops * 1e12 * world)
    record["memory_gb"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                           else psutil.Process().memory_info().rss) / 2**30
    return record


def weight_sums(w: torch.Tensor) -> torch.Tensor:
    """[sum of row L2 norms, rows, sum, sum of squares, elements] of a whole 2-D weight, in fp64."""
    w = w.detach().double()
    n = torch.tensor(float(w.shape[0]), device=w.device)
    return torch.stack([(w ** 2).sum(1).sqrt().sum(), n, w.sum(), (w ** 2).sum(),
                        torch.tensor(float(w.numel()), device=w.device)])


def norm_record(stats: torch.Tensor, input_layer: str) -> dict:
    """The paper's norm-drift statistics from `weight_sums`-style totals: mean row norm and std."""
    row_norm = (stats[0] / stats[1].clamp_min(1)).item()
    n = stats[4].clamp_min(2)
    std = ((stats[3] - stats[2] ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
    name = "projection" if input_layer == "kronecker" else "table"
    return {f"{name}_row_norm": row_norm, f"{name}_std": std}


def finish_step(trainer, record: dict, metrics, faults: Faults, step: int, tokens: int, skipped: int) -> None:
    """What both engines do after an update. `trainer` has cfg, ckpt_dir, norm_stats(), evaluate() and
    save(step, tokens, skipped). In order: log (with the norm statistics, a collective, only when logged),
    evaluate, checkpoint, the fault hooks, then the preemption check (a collective: every rank stops at
    the same step, after saving unless this step was just saved)."""
    cfg = trainer.cfg
    last = step == cfg.schedule.train_steps
    if step % cfg.logging.every == 0 or last:
        record.update(trainer.norm_stats())
        metrics.write(record)
    if cfg.eval.every and (step % cfg.eval.every == 0 or last):
        val = trainer.evaluate()
        if val is not None:
            metrics.write({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50)), "tokens": tokens})
    if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_at_end):
        trainer.save(step, tokens, skipped)
    if step == faults.crash_at:                        # fault injection for the resume tests
        os._exit(137)
    time.sleep(faults.step_sleep_s)
    signame = preemption.requested()
    if signame and not last:
        if not saved_at(trainer.ckpt_dir, step):
            trainer.save(step, tokens, skipped)
        metrics.close()
        raise preemption.Preempted(step, signame)
