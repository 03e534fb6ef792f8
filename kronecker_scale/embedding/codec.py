"""The Kronecker codec of DESIGN.md §2: the dense reference and its closed form.

For a token with L bytes b_0..b_{L-1} (P = pos_dim, D = 256 * P), the reference builds the D-wide
code x with L entries s(L) at index b_p * P + p, z-normalizes it, and projects it with W [D, d].
Because x is s(L) on L cells and 0 elsewhere, z-normalization is an affine map that depends only on
L, so

    e_t = alpha(L) * sum_{p<L} W[b_p * P + p] + beta(L) * S,     S = sum_j W[j]

`scale_tables` gives alpha and beta for L = 0..P; `dense_codec` is the reference (materialises
[N, D]), used by the tests and the `dense` implementation.
"""
from __future__ import annotations

import math

import torch

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
    return (torch.tensor(alpha, dtype=torch.float64).to(dtype),
            torch.tensor(beta, dtype=torch.float64).to(dtype))


def flat_codec_index(token_bytes: torch.Tensor) -> torch.Tensor:
    """Row index byte * P + pos for every (token, position): [N, P] int64."""
    P = token_bytes.shape[-1]
    pos = torch.arange(P, device=token_bytes.device)
    return token_bytes.long() * P + pos


def dense_codec(
    token_bytes: torch.Tensor,
    lengths: torch.Tensor,
    *,
    length_normalize: bool = True,
    z_normalize: bool = True,
    eps: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference package's codec, materialised: [N, D] in `dtype` (the reference uses fp32).

    token_bytes: uint8 [N, P]; lengths: [N] (bytes at positions >= L are ignored).
    """
    N, P = token_bytes.shape
    D = codec_dim(P)
    L = lengths.to(torch.int64).reshape(N, 1)
    valid = torch.arange(P, device=token_bytes.device) < L
    value = torch.rsqrt(L.clamp_min(1).to(dtype)) if length_normalize else torch.ones_like(L, dtype=dtype)
    src = valid.to(dtype) * value
    x = torch.zeros(N, D, dtype=dtype, device=token_bytes.device)
    x.scatter_add_(1, flat_codec_index(token_bytes), src)
    if z_normalize:
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).std(dim=-1, keepdim=True) + eps
        x = (x - mean) / std
    return x
