"""The Kronecker codec of docs/design.md §2 in closed form: the runtime math (the materialised reference is
reference.py).

For a token with L bytes b_0..b_{L-1} (P = pos_dim, D = 256 * P), the reference builds the D-wide
code x with L entries s(L) at index b_p * P + p, z-normalizes it, and projects it with W [D, d].
Because x is s(L) on L cells and 0 elsewhere, z-normalization is an affine map that depends only on
L, so

    e_t = alpha(L) * sum_{p<L} W[b_p * P + p] + beta(L) * S,     S = sum_j W[j]

`scale_tables` gives alpha and beta for L = 0..P; `kronecker_embed_torch` is that formula in torch
(an `embedding_bag` over the <= P valid rows per token): the CPU path of KroneckerEmbedding, the
table that megatron's input layer and the exporters materialise, and what the probes embed with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_BYTE_VALUES = 256


def codec_dim(pos_dim: int) -> int:
    """D = 256 * pos_dim, the width of the byte code and the number of rows of the projection."""
    return NUM_BYTE_VALUES * pos_dim


def scale_tables(
    pos_dim: int,
    *,
    length_normalize: bool = True,
    z_normalize: bool = True,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha(L), beta(L) for L = 0..pos_dim, computed in fp64 and cast to `dtype`.

    alpha(0) = beta(0) = 0: empty tokens and padded vocab rows embed to zero (the reference gives
    0 / (0 + eps) = 0 there too).
    """
    D = codec_dim(pos_dim)
    alpha = [0.0] * (pos_dim + 1)
    beta = [0.0] * (pos_dim + 1)
    for L in range(1, pos_dim + 1):
        s = 1.0 / math.sqrt(L) if length_normalize else 1.0
        if not z_normalize:
            alpha[L] = s
            continue
        mu = L * s / D
        # unbiased variance of a vector with L entries s and D - L zeros, exactly as torch.std
        var = (L * s * s - D * mu * mu) / (D - 1)
        sigma = math.sqrt(max(var, 0.0)) + eps
        alpha[L] = s / sigma
        beta[L] = -mu / sigma
    return (torch.tensor(alpha, dtype=torch.float64).to(dtype), torch.tensor(beta, dtype=torch.float64).to(dtype))


def flat_codec_index(token_bytes: torch.Tensor) -> torch.Tensor:
    """Row index byte * P + pos for every (token, position): [N, P] int64."""
    P = token_bytes.shape[-1]
    pos = torch.arange(P, device=token_bytes.device)
    return token_bytes.long() * P + pos


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def kronecker_embed_torch(
    token_bytes: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Closed form for explicit bytes: uint8 [N, P], lengths [N], weight [D, d] -> [N, d] in weight dtype.

    alpha/beta are the [P + 1] scale tables (any float dtype; used in the compute dtype). `weight` may
    be a column slice of the full projection (tensor-parallel shard). No [N, D] tensor; fp32
    accumulation for half types.
    """
    N, P = token_bytes.shape
    cdt = _compute_dtype(weight.dtype)
    w = weight.to(cdt)
    L = lengths.to(torch.int64)
    valid = torch.arange(P, device=token_bytes.device) < L[:, None]
    rows = flat_codec_index(token_bytes)[valid]  # [sum L], token-major order
    offsets = torch.zeros(N, dtype=torch.int64, device=token_bytes.device)
    if N > 1:
        offsets[1:] = torch.cumsum(L, 0)[:-1]
    a, b = alpha.to(device=w.device, dtype=cdt)[L], beta.to(device=w.device, dtype=cdt)[L]
    out = F.embedding_bag(rows, w, offsets, mode="sum", per_sample_weights=a.repeat_interleave(L))
    out = out + b[:, None] * w.sum(0)  # beta = 0 without z-normalization; no branch, no host sync
    return out.to(weight.dtype)


def __getattr__(name: str):
    # `dense_codec` lived here before reference.py; old imports of it from this module keep working
    if name == "dense_codec":
        from .reference import dense_codec

        return dense_codec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
