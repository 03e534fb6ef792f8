"""What one logged step says: the per-step record (loss, lr, throughput, MFU, memory) and the paper's
norm-drift statistics of the input layer, from totals each engine gathers over its own layout."""
from __future__ import annotations

import math

import psutil
import torch
from omegaconf import DictConfig


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
    """The norm-drift statistics from `weight_sums`-style totals: mean row norm and std."""
    row_norm = (stats[0] / stats[1].clamp_min(1)).item()
    n = stats[4].clamp_min(2)
    std = ((stats[3] - stats[2] ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
    name = "projection" if input_layer == "kronecker" else "table"
    return {f"{name}_row_norm": row_norm, f"{name}_std": std}
