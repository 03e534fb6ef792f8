"""Fused Triton kernels for the Kronecker embedding (DESIGN.md §2).

Forward, per token t (ids read on the fly from the uint8 byte table and int16 lengths):

    out[t] = alpha(L_t) * sum_{p < L_t} W[b_{t,p} * P + p]  +  beta(L_t) * S,     S = colsum(W)

Backward (dW; no other input has a gradient):

    dW[j] = sum_{(t,p): b_{t,p} P + p = j} alpha(L_t) g_t   +   sum_t beta(L_t) g_t   (second term: every row)

- `fast` backward: the sparse part is scattered with fp32 atomics (order-dependent rounding);
- `deterministic` backward: (row, token) pairs are sorted by row once (stable), each row's pairs are
  summed in fixed-size chunks in order, and each row sums its chunks in order: bitwise reproducible.

Both kernels take any strides, so they run on a column slice of `weight` (the tensor-parallel shard)
and on a slice of the ids (the sequence-parallel part) without copies. Accumulation is fp32; the
output has the weight's dtype. Nothing is saved for backward but the ids and the (tiny) tables.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(block_ns, block_ds, warps):
    if INTERPRET:  # the CPU interpreter runs every config it is given: keep one, small
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 128}, num_warps=1)]  # its cost is per program
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w)
            for bn in block_ns for bd in block_ds for w in warps]


@triton.jit
def _token_block(ids_ptr, lengths_ptr, alpha_ptr, N, d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tokens and columns: offsets, masks, ids, lengths L and alpha(L)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < N
    d_mask = offs_d < d
    ids = tl.load(ids_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    L = tl.load(lengths_ptr + ids, mask=n_mask, other=0).to(tl.int32)
    alpha = tl.load(alpha_ptr + L, mask=n_mask, other=0.0)
    return offs_n, offs_d, n_mask, d_mask, ids, L, alpha


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs([16, 32, 64], [64, 128, 256], [4, 8]), key=["d", "P"])
@triton.jit
def _forward_kernel(ids_ptr, bytes_ptr, lengths_ptr, alpha_ptr, beta_ptr, w_ptr, colsum_ptr, out_ptr,
                    N, d, stride_wr, stride_wc, stride_on, stride_oc,
                    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n, offs_d, n_mask, d_mask, ids, L, alpha = _token_block(ids_ptr, lengths_ptr, alpha_ptr, N, d,
                                                                 BLOCK_N, BLOCK_D)
    beta = tl.load(beta_ptr + L, mask=n_mask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    max_len = tl.max(L, axis=0)                 # most tokens are short: stop at the block's longest
    for p in range(0, max_len):
        byte = tl.load(bytes_ptr + ids * P + p, mask=n_mask, other=0).to(tl.int64)
        valid = n_mask & (p < L)
        row = byte * P + p
        w = tl.load(w_ptr + row[:, None] * stride_wr + offs_d[None, :] * stride_wc,
                    mask=valid[:, None] & d_mask[None, :], other=0.0)
        acc += w.to(tl.float32)
    colsum = tl.load(colsum_ptr + offs_d, mask=d_mask, other=0.0)
    out = acc * alpha[:, None] + beta[:, None] * colsum[None, :]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_d[None, :] * stride_oc,
             out.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


# ------------------------------------------------------------------------------------------
# backward, fast: fp32 atomics (autotuning re-runs the kernel, so the buffer is re-zeroed each trial)
# ------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs([16, 32, 64], [64, 128], [4, 8]), key=["d", "P"], reset_to_zero=["dw_ptr"])
@triton.jit
def _backward_atomic_kernel(ids_ptr, bytes_ptr, lengths_ptr, alpha_ptr, g_ptr, dw_ptr,
                            N, d, stride_gn, stride_gc, stride_dr,
                            P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n, offs_d, n_mask, d_mask, ids, L, alpha = _token_block(ids_ptr, lengths_ptr, alpha_ptr, N, d,
                                                                 BLOCK_N, BLOCK_D)
    g = tl.load(g_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gc,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    scaled = g * alpha[:, None]
    max_len = tl.max(L, axis=0)
    for p in range(0, max_len):
        byte = tl.load(bytes_ptr + ids * P + p, mask=n_mask, other=0).to(tl.int64)
        valid = n_mask & (p < L)
        row = byte * P + p
        tl.atomic_add(dw_ptr + row[:, None] * stride_dr + offs_d[None, :], scaled,
                      mask=valid[:, None] & d_mask[None, :])


# ------------------------------------------------------------------------------------------
# backward, deterministic: chunk partial sums in sorted order, then per-row sums of chunks
# ------------------------------------------------------------------------------------------
@triton.jit
def _chunk_sum_kernel(chunk_start_ptr, chunk_end_ptr, pair_token_ptr, pair_coef_ptr, g_ptr, partial_ptr,
                      d, stride_gn, stride_gc, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_end_ptr + c)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(start, end):
        t = tl.load(pair_token_ptr + i)
        coef = tl.load(pair_coef_ptr + i)
        g = tl.load(g_ptr + t * stride_gn + offs_d * stride_gc, mask=d_mask, other=0.0).to(tl.float32)
        acc += coef * g
    tl.store(partial_ptr + c.to(tl.int64) * d + offs_d, acc, mask=d_mask)


@triton.jit
def _row_sum_kernel(rows_ptr, row_chunk_start_ptr, partial_ptr, dense_ptr, dw_ptr, d, stride_dr, stride_dc,
                    BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    r = tl.load(rows_ptr + k).to(tl.int64)
    first = tl.load(row_chunk_start_ptr + k)
    last = tl.load(row_chunk_start_ptr + k + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(first, last):
        acc += tl.load(partial_ptr + c * d + offs_d, mask=d_mask, other=0.0)  # c is int64 (bounds are)
    acc += tl.load(dense_ptr + offs_d, mask=d_mask, other=0.0)
    tl.store(dw_ptr + r * stride_dr + offs_d * stride_dc, acc.to(dw_ptr.dtype.element_ty), mask=d_mask)


CHUNK = 32           # pairs summed by one program: bounds the work of the busiest row's programs
DET_BLOCK_D = 128


def _deterministic_dw(ids, token_bytes, token_lengths, alpha, g, dense, codec_rows, out_dtype):
    """dW without atomics: fixed summation order, so two runs are bitwise equal.

    Rows no token touches get the dense term alone; the touched rows sum their chunk partials in
    order and add it. The index bookkeeping is torch (stable sort, unique_consecutive, cumsum).
    """
    N, d = g.shape
    P = token_bytes.shape[1]
    dev = g.device
    L = token_lengths[ids].to(torch.int64)
    valid = torch.arange(P, device=dev) < L[:, None]
    rows = (token_bytes[ids].to(torch.int64) * P + torch.arange(P, device=dev))[valid]
    token = torch.arange(N, device=dev)[:, None].expand(N, P)[valid]
    rows, order = torch.sort(rows, stable=True)          # stable: tokens keep their order within a row
    token = token[order].contiguous()
    coef = alpha[L][token].contiguous()
    touched, counts = torch.unique_consecutive(rows, return_counts=True)
    row_start = torch.cumsum(counts, 0) - counts
    chunks_per_row = (counts + CHUNK - 1) // CHUNK
    num_chunks = int(chunks_per_row.sum())
    row_chunk_start = torch.zeros(len(touched) + 1, dtype=torch.int64, device=dev)
    row_chunk_start[1:] = torch.cumsum(chunks_per_row, 0)
    chunk_row = torch.repeat_interleave(torch.arange(len(touched), device=dev), chunks_per_row,
                                        output_size=num_chunks)
    chunk_start = row_start[chunk_row] + (torch.arange(num_chunks, device=dev) - row_chunk_start[chunk_row]) * CHUNK
    chunk_end = torch.minimum(chunk_start + CHUNK, row_start[chunk_row] + counts[chunk_row])
    dw = dense.to(out_dtype).expand(codec_rows, d).contiguous()
    if num_chunks:
        partial = torch.empty(num_chunks, d, dtype=torch.float32, device=dev)
        _chunk_sum_kernel[(num_chunks, triton.cdiv(d, DET_BLOCK_D))](
            chunk_start, chunk_end, token, coef, g, partial, d, g.stride(0), g.stride(1), BLOCK_D=DET_BLOCK_D)
        _row_sum_kernel[(len(touched), triton.cdiv(d, DET_BLOCK_D))](
            touched, row_chunk_start, partial, dense, dw, d, dw.stride(0), dw.stride(1), BLOCK_D=DET_BLOCK_D)
    return dw


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------
def _grid(N, d):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))


class KroneckerEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, token_bytes, token_lengths, weight, alpha, beta, deterministic):
        ids = ids.reshape(-1)
        N = ids.numel()
        D, d = weight.shape
        P = token_bytes.shape[1]
        alpha32 = alpha.to(device=weight.device, dtype=torch.float32).contiguous()
        beta32 = beta.to(device=weight.device, dtype=torch.float32).contiguous()
        colsum = weight.sum(0, dtype=torch.float32)
        out = torch.empty(N, d, dtype=weight.dtype, device=weight.device)
        if N:
            _forward_kernel[_grid(N, d)](ids, token_bytes, token_lengths, alpha32, beta32, weight, colsum, out,
                                         N, d, weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                                         P=P)
        ctx.save_for_backward(ids, token_bytes, token_lengths, alpha32, beta32)
        ctx.weight_meta = (D, d, weight.dtype)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, token_bytes, token_lengths, alpha32, beta32 = ctx.saved_tensors
        D, d, dtype = ctx.weight_meta
        N = ids.numel()
        P = token_bytes.shape[1]
        g = grad_out.reshape(N, d)
        beta_t = beta32[token_lengths[ids].to(torch.int64)]
        dense = (g.to(torch.float32) * beta_t[:, None]).sum(0)      # sum_t beta_t g_t, one d-vector
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        if deterministic:
            dw = _deterministic_dw(ids, token_bytes, token_lengths, alpha32, g, dense, D, dtype)
        else:
            dw32 = torch.zeros(D, d, dtype=torch.float32, device=g.device)
            if N:
                _backward_atomic_kernel[_grid(N, d)](ids, token_bytes, token_lengths, alpha32, g, dw32,
                                                     N, d, g.stride(0), g.stride(1), dw32.stride(0), P=P)
            dw = (dw32 + dense).to(dtype)
        return None, None, None, dw, None, None, None


def kronecker_embedding_triton(ids, token_bytes, token_lengths, weight, alpha, beta, deterministic=None):
    """[N] ids -> [N, d] embeddings with the fused kernels; `weight` may be a column slice.

    deterministic: None follows torch.are_deterministic_algorithms_enabled(); True/False forces it.
    """
    return KroneckerEmbeddingFunction.apply(ids, token_bytes, token_lengths, weight, alpha, beta, deterministic)
