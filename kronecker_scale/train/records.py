"""What one logged step says: the per-step record (loss, lr, throughput, MFU, memory) and the paper's
norm-drift statistics of the input layer (`norm_record`), from totals each engine gathers over its own
layout (`weight_sums`).

MFU (docs/design.md §6.1): model FLOPs per trained token from `model_flops_per_token` (the transformer
layers' matmuls, causal attention, the head; the input layer is a gather and counts 0), times tokens/s,
over logging.peak_tflops x the number of devices."""

from __future__ import annotations

import math

import psutil
import torch
from omegaconf import DictConfig

from ..model.config import GPTConfig, padded_vocab_size


def model_flops_per_token(
    model_cfg: GPTConfig, vocab_size: int, tensor_parallel: int = 1, *, causal_attention: str = "half"
) -> dict[str, int]:
    """Training FLOPs (forward + backward = 3 x forward, a multiply-add = 2 FLOPs) per token of the whole
    model, by part (docs/design.md §6.1). `vocab_size` is the tokenizer's; the head runs on the padded
    vocabulary (multiple of vocab_divisible_by x TP), as the GPU does.

    - layers: 6 x the weight-matrix parameters of the transformer layers (QKV 3d^2 + output d^2 + MLP 2df,
      SwiGLU 3df); biases, norms, softmax and activations are elementwise and not counted.
    - attention: QK^T and AV. Causal, counted as computed by a causal kernel (`half`): query i attends to
      i + 1 keys, 2 x 2d(i + 1) forward FLOPs, averaged over s queries: 6 L d (s + 1) per token. `full`
      gives PaLM's 12 L d s (the whole s^2 score matrix, what the unfused local path computes).
    - head: 6 d V_padded (the logits matmul; every head type).
    - input: 0. A BPE table is a lookup; the Kronecker layer is a gather of <= P rows of W per token
      (<= 2 P d adds forward, as many scattered backward), not 6 x its 256 P d parameters.
    """
    d, L, s = model_cfg.d_model, model_cfg.n_layers, model_cfg.seq_len
    f = model_cfg.ffn_hidden or 4 * d
    mlp = (3 if model_cfg.activation == "swiglu" else 2) * d * f
    V = padded_vocab_size(vocab_size, model_cfg.vocab_divisible_by, tensor_parallel)
    if causal_attention not in ("half", "full"):
        raise ValueError(f"causal_attention={causal_attention!r}: use half or full")
    parts = {
        "layers": 6 * L * (4 * d * d + mlp),
        "attention": 6 * L * d * (s + 1) if causal_attention == "half" else 12 * L * d * s,
        "head": 6 * d * V,
        "input": 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def step_record(
    cfg: DictConfig,
    *,
    step: int,
    loss: float,
    lr: float,
    grad_norm,
    tokens: int,
    tokens_per_step: int,
    step_time: float,
    skipped: int,
    n_params: int,
    flops_per_token: float | None = None,
) -> dict:
    """`flops_per_token`: the engine's model_flops_per_token total (MFU when logging.peak_tflops is set);
    without it MFU falls back to 6 x this rank's parameters."""
    record = {
        "step": step,
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens": tokens,
        "step_time": step_time,
        "tokens_per_s": tokens_per_step / step_time,
        "skipped_steps": skipped,
    }
    if cfg.logging.peak_tflops:
        world = torch.distributed.get_world_size()
        per_token = flops_per_token if flops_per_token else 6 * n_params
        record["mfu"] = per_token * record["tokens_per_s"] / (cfg.logging.peak_tflops * 1e12 * world)
    record["memory_gb"] = (
        torch.cuda.max_memory_allocated() if torch.cuda.is_available() else psutil.Process().memory_info().rss
    ) / 2**30
    return record


def weight_sums(
    w: torch.Tensor, input_layer: str, *, real_rows: int | None = None, row_offset: int = 0, row_sq=None
) -> torch.Tensor:
    """Totals of one rank's part of the input layer's weight, in fp64, that add up over the parts:

    [sum of row L2 norms, rows, sum, sum of squares, elements, paper sum, paper sum of squares, paper count]

    The last three are the paper's statistic (docs/paper.md "Norm drift"): Kronecker W [D, d] -> the L2
    norms of its d output units (the columns: each is whole on the rank that holds it, so a `shard_d` part
    gives its own columns' norms); BPE table [V, d] -> the L2 norms of the rows whose global id
    (`row_offset` + local row) is below `real_rows` (padded rows left out). `row_sq`: the squared row
    norms when the rows are split over ranks (shard_d: all-reduced by the caller); else from `w`."""
    w = w.detach().double()
    dev = w.device
    if row_sq is None:
        row_sq = (w**2).sum(1)
    if input_layer == "kronecker":
        paper = (w**2).sum(0).sqrt()  # the norms of this part's output units
    else:
        real = w.shape[0] if real_rows is None else max(0, min(w.shape[0], real_rows - row_offset))
        paper = row_sq[:real].sqrt()

    def count(n) -> torch.Tensor:
        return torch.tensor(float(n), device=dev)

    return torch.stack(
        [
            row_sq.sqrt().sum(),
            count(w.shape[0]),
            w.sum(),
            (w**2).sum(),
            count(w.numel()),
            paper.sum(),
            (paper**2).sum(),
            count(paper.numel()),
        ]
    )


def _mean_std(total: torch.Tensor, squares: torch.Tensor, n: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased, as torch.std) standard deviation from a sum, a sum of squares and a count."""
    mean = (total / n.clamp_min(1)).item()
    m = n.clamp_min(2)
    return mean, ((squares - total**2 / m) / (m - 1)).clamp_min(0).sqrt().item()


def norm_record(stats: torch.Tensor, input_layer: str) -> dict:
    """The norm-drift statistics from `weight_sums` totals (summed over the parts of the weight):

    - Kronecker: `projection_row_norm` (mean L2 norm of W's D rows) and `projection_std` (of W's entries);
      the paper's `projection_unit_norm` (mean over the d output units of the L2 norm of the unit's D
      weights, W's column norms: about 1.0 at init, W ~ N(0, 1/D)) and `projection_unit_norm_std`.
    - BPE: the paper's `table_row_norm` (mean L2 norm of the real ids' rows, padded rows left out) and
      `table_row_norm_std`; `table_std` (of all the table's entries)."""
    n = stats[4].clamp_min(2)
    std = ((stats[3] - stats[2] ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
    paper, paper_std = _mean_std(stats[5], stats[6], stats[7])
    if input_layer == "kronecker":
        return {
            "projection_row_norm": (stats[0] / stats[1].clamp_min(1)).item(),
            "projection_std": std,
            "projection_unit_norm": paper,
            "projection_unit_norm_std": paper_std,
        }
    return {"table_row_norm": paper, "table_row_norm_std": paper_std, "table_std": std}
