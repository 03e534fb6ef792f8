"""What one logged step says: the per-step record (loss, lr, throughput, MFU, memory) and the paper's
norm-drift statistics of the input layer, from totals each engine gathers over its own layout.

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


def weight_sums(w: torch.Tensor) -> torch.Tensor:
    """[sum of row L2 norms, rows, sum, sum of squares, elements] of a whole 2-D weight, in fp64."""
    w = w.detach().double()
    n = torch.tensor(float(w.shape[0]), device=w.device)
    return torch.stack(
        [(w**2).sum(1).sqrt().sum(), n, w.sum(), (w**2).sum(), torch.tensor(float(w.numel()), device=w.device)]
    )


def norm_record(stats: torch.Tensor, input_layer: str) -> dict:
    """The norm-drift statistics from `weight_sums`-style totals: mean row norm and std."""
    row_norm = (stats[0] / stats[1].clamp_min(1)).item()
    n = stats[4].clamp_min(2)
    std = ((stats[3] - stats[2] ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
    name = "projection" if input_layer == "kronecker" else "table"
    return {f"{name}_row_norm": row_norm, f"{name}_std": std}
