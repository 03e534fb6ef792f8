"""The reference implementation of the Kronecker codec (docs/design.md §2), materialised.

`dense_codec` builds the D-wide code of every token exactly as the reference package does (L cells
s(L) = 1/sqrt(L) at byte * P + pos, then z-normalisation with the unbiased std + eps), and
`kronecker_embed_dense` projects it with a matmul. Both hold an [N, D] tensor (D = 256 * P), so they
are for checking and comparing, not for training at scale: the tests check the closed form
(codec.kronecker_embed_torch) and the kernels against them, the benchmark times them (`kron_dense`),
and KroneckerEmbedding(impl="dense") runs them when asked for the reference semantics.
"""

from __future__ import annotations

import torch

from .codec import codec_dim, flat_codec_index


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


def kronecker_embed_dense(
    token_bytes: torch.Tensor,
    lengths: torch.Tensor,
    weight: torch.Tensor,
    *,
    length_normalize: bool,
    z_normalize: bool,
    eps: float,
) -> torch.Tensor:
    """Reference semantics: codec in fp32 (fp64 for an fp64 weight), cast to the weight dtype, matmul."""
    codec_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = dense_codec(
        token_bytes, lengths, length_normalize=length_normalize, z_normalize=z_normalize, eps=eps, dtype=codec_dtype
    )
    return x.to(weight.dtype) @ weight
