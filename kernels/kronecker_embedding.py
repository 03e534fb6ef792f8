"""Fused Triton kernels for the Kronecker embedding (docs/design.md §2).

Forward, per token t (ids read on the fly from the uint8 byte table and int16 lengths):

    out[t] = alpha(L_t) * sum_{p < L_t} W[b_{t,p} * P + p]  +  beta(L_t) * S,     S = colsum(W)

Backward (dW; no other input has a gradient):

    dW[j] = sum_{(t,p): b_{t,p} P + p = j} alpha(L_t) g_t   +   b,    b = sum_t beta(L_t) g_t   (b: every row)

Memory traffic is the design constraint (docs/benchmarks.md, "Bytes model"): no [N, d] temporary exists
in either direction. The broadcast term b is a [d] vector reduced inside the kernels and added to every
row while dW is written; dW is written once, already in its final dtype.

- `fast` backward: one kernel reads each token's gradient once, adds beta(L_t) g_t into b and scatters
  alpha(L_t) g_t into an fp32 accumulator with relaxed atomics (order-dependent rounding); a second,
  streaming kernel writes dW = acc + b in the weight's dtype (the cast fused). With an fp32 `main_grad`
  (megatron's gradient-accumulation fusion) the scatter goes straight into main_grad and the second
  kernel only adds b to its rows: no [D, d] scratch at all.
- `deterministic` backward: the (row, token) pairs of all N x P cells (invalid cells keyed past the last
  row) are stably sorted by row on the device, row boundaries found with searchsorted (no host sync,
  no data-dependent sizes); b is summed per fixed token chunk, then the chunks in order; one kernel then
  sums each row's pairs in sorted order and writes acc + b (or adds it to main_grad). Every summation
  order is fixed by the shapes and the constants below, never by timing: bitwise reproducible.

S = colsum(W) is cached (`cached_colsum`): computed once per optimizer step, not once per micro-batch.
Offsets are int64 wherever N*d or D*d can pass 2^31. Both kernels take any strides, so they run on a
column slice of `weight` (the tensor-parallel shard) and on a slice of the ids (the sequence-parallel
part) without copies. Accumulation is fp32. Nothing is saved for backward but the ids and the tables.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from torch.optim.optimizer import register_optimizer_step_post_hook

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------
# colsum(W), once per optimizer step
# ------------------------------------------------------------------------------------------
# S = colsum(W) reads all of W (D x d). W changes only when the optimizer (or a load, or an init)
# writes it, so S is cached per weight tensor and recomputed only when one of these changed:
#   - the cache generation: bumped after every torch.optim.Optimizer.step() (a global post-hook; every
#     optimizer this project uses subclasses it: torch's, apex/TE/DeepSpeed FusedAdam, and the inner
#     optimizer of megatron's and DeepSpeed's wrappers), and by clear_colsum_cache();
#   - weight._version: any in-place write through the tensor or a view of it (copy_, add_, init);
#   - weight.data_ptr(), shape, strides, dtype: new storage (megatron DDP's buffers, `.data = ...`).
# Fused optimizers (torch's AdamW(fused=True) among them) and megatron's distributed optimizer write
# parameters without bumping _version; the step hook covers them. What neither sees is a write through
# `.data` or another alias outside an optimizer step (an EMA swap, a manual `p.data.copy_`): call
# clear_colsum_cache() after one, or pass cache_colsum=False.
_colsum_cache: dict[int, tuple] = {}
_generation = 0
colsum_stats = {"computed": 0, "reused": 0}


def clear_colsum_cache() -> None:
    """Forget every cached colsum(W): the next forward recomputes S from the weight."""
    global _generation
    _generation += 1
    _colsum_cache.clear()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


_step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def cached_colsum(weight: torch.Tensor) -> torch.Tensor:
    """colsum(W) in fp32 ([d]), computed once per optimizer step for a given weight tensor (see above)."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors have no version counter: no caching
        colsum_stats["computed"] += 1
        return weight.detach().sum(0, dtype=torch.float32)
    key = (_generation, version, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
    entry = _colsum_cache.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        colsum_stats["reused"] += 1
        return entry[2]
    colsum_stats["computed"] += 1
    S = weight.detach().sum(0, dtype=torch.float32)
    ident = id(weight)

    def forget(ref, ident=ident):  # the weight was freed: drop its entry (if still ours)
        current = _colsum_cache.get(ident)
        if current is not None and current[0] is ref:
            del _colsum_cache[ident]

    _colsum_cache[ident] = (weakref.ref(weight, forget), key, S)
    return S


# ------------------------------------------------------------------------------------------
# autotuning: a few configurations per (d, P, dtypes), pruned by d
# ------------------------------------------------------------------------------------------
FORWARD_CONFIGS = [(32, 64, 4), (32, 128, 4), (64, 128, 4), (32, 256, 8), (64, 256, 8)]  # BLOCK_N, BLOCK_D, warps
SCATTER_CONFIGS = [(32, 64, 4), (32, 128, 4), (64, 128, 8), (16, 256, 4)]


def _configs(table):
    if INTERPRET:  # the CPU interpreter runs every config it is given: keep one, small
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 128}, num_warps=1)]  # its cost is per program
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w) for bn, bd, w in table]


def prune_configs(configs, named_args, **kwargs):
    """Drop column blocks wider than d needs (the next power of two, at least 64): at d = 4,096 all
    stay, at d = 64 only the 64-wide ones. Autotuning is keyed on (d, P) and the tensors' dtypes."""
    d = named_args.get("d", kwargs.get("d"))
    width = max(64, triton.next_power_of_2(int(d)))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= width]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]


@triton.jit
def _token_block(ids_ptr, lengths_ptr, alpha_ptr, N, d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tokens and columns: int64 offsets (offs * stride may pass 2^31), masks, ids,
    lengths L and alpha(L)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    n_mask = offs_n < N
    d_mask = offs_d < d
    ids = tl.load(ids_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    L = tl.load(lengths_ptr + ids, mask=n_mask, other=0).to(tl.int32)
    alpha = tl.load(alpha_ptr + L, mask=n_mask, other=0.0)
    return offs_n, offs_d, n_mask, d_mask, ids, L, alpha


# ------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(FORWARD_CONFIGS), key=["d", "P"], prune_configs_by={"early_config_prune": prune_configs}
)
@triton.jit
def _forward_kernel(
    ids_ptr,
    bytes_ptr,
    lengths_ptr,
    alpha_ptr,
    beta_ptr,
    w_ptr,
    colsum_ptr,
    out_ptr,
    N,
    d,
    stride_wr,
    stride_wc,
    stride_on,
    stride_oc,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid axis 0 (token blocks) varies fastest: the programs in flight share one column block, so the
    # D x BLOCK_D slice of W they gather from stays in L2 and W is read from memory about once
    offs_n, offs_d, n_mask, d_mask, ids, L, alpha = _token_block(
        ids_ptr, lengths_ptr, alpha_ptr, N, d, BLOCK_N, BLOCK_D
    )
    beta = tl.load(beta_ptr + L, mask=n_mask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    max_len = tl.max(L, axis=0)  # most tokens are short: stop at the block's longest
    for p in range(0, max_len):
        byte = tl.load(bytes_ptr + ids * P + p, mask=n_mask, other=0).to(tl.int64)
        valid = n_mask & (p < L)
        row = byte * P + p
        w = tl.load(
            w_ptr + row[:, None] * stride_wr + offs_d[None, :] * stride_wc,
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += w.to(tl.float32)
    colsum = tl.load(colsum_ptr + offs_d, mask=d_mask, other=0.0)
    out = acc * alpha[:, None] + beta[:, None] * colsum[None, :]
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_d[None, :] * stride_oc,
        out.to(out_ptr.dtype.element_ty),
        mask=n_mask[:, None] & d_mask[None, :],
    )


# ------------------------------------------------------------------------------------------
# backward, fast: one read of g; relaxed fp32 atomics; b reduced in the same pass
# ------------------------------------------------------------------------------------------
# restore_value: tuning runs the kernel once per config; the destination (a zeroed scratch or a
# main_grad that already holds gradients) and b are put back after each trial
@triton.autotune(
    configs=_configs(SCATTER_CONFIGS),
    key=["d", "P"],
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["dst_ptr", "bvec_ptr"],
)
@triton.jit
def _scatter_kernel(
    ids_ptr,
    bytes_ptr,
    lengths_ptr,
    alpha_ptr,
    beta_ptr,
    g_ptr,
    dst_ptr,
    bvec_ptr,
    N,
    d,
    stride_gn,
    stride_gc,
    stride_dr,
    stride_dc,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_n, offs_d, n_mask, d_mask, ids, L, alpha = _token_block(
        ids_ptr, lengths_ptr, alpha_ptr, N, d, BLOCK_N, BLOCK_D
    )
    beta = tl.load(beta_ptr + L, mask=n_mask, other=0.0)
    g = tl.load(
        g_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gc,
        mask=n_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    # b += sum over this block's tokens of beta(L_t) g_t: BLOCK_D atomics per program, not an [N, d] temporary
    tl.atomic_add(bvec_ptr + offs_d, tl.sum(g * beta[:, None], axis=0), mask=d_mask, sem="relaxed")
    scaled = g * alpha[:, None]
    max_len = tl.max(L, axis=0)
    for p in range(0, max_len):
        byte = tl.load(bytes_ptr + ids * P + p, mask=n_mask, other=0).to(tl.int64)
        valid = n_mask & (p < L)
        row = byte * P + p
        # relaxed: nothing reads dst before the kernel ends (stream order), so no ordering is needed
        tl.atomic_add(
            dst_ptr + row[:, None] * stride_dr + offs_d[None, :] * stride_dc,
            scaled,
            mask=valid[:, None] & d_mask[None, :],
            sem="relaxed",
        )


@triton.jit
def _finalize_kernel(
    acc_ptr,
    bvec_ptr,
    dst_ptr,
    D,
    d,
    stride_ar,
    stride_ac,
    stride_dr,
    stride_dc,
    HAS_ACC: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dst = [dst +] [acc +] b, row by row, in dst's dtype: the broadcast and the cast in one pass."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = cols < d
    mask = (rows < D)[:, None] & d_mask[None, :]
    b = tl.load(bvec_ptr + cols, mask=d_mask, other=0.0)
    out = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32) + b[None, :]
    if HAS_ACC:
        out += tl.load(acc_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac, mask=mask, other=0.0)
    dst = dst_ptr + rows[:, None] * stride_dr + cols[None, :] * stride_dc
    if ACCUMULATE:
        out += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=mask)


FIN_BLOCK_R, FIN_BLOCK_D = (256, 128) if INTERPRET else (16, 256)


def _finalize(acc, bvec, dst, accumulate: bool) -> None:
    D, d = dst.shape
    has_acc = acc is not None
    a = acc if has_acc else dst
    grid = (triton.cdiv(D, FIN_BLOCK_R), triton.cdiv(d, FIN_BLOCK_D))
    _finalize_kernel[grid](
        a,
        bvec,
        dst,
        D,
        d,
        a.stride(0),
        a.stride(1),
        dst.stride(0),
        dst.stride(1),
        HAS_ACC=has_acc,
        ACCUMULATE=accumulate,
        BLOCK_R=FIN_BLOCK_R,
        BLOCK_D=FIN_BLOCK_D,
    )


def _fast_dw(ids, token_bytes, token_lengths, alpha32, beta32, g, dst, accumulate: bool):
    """dst (= or +=) dW with atomics. dst: [D, d], any float dtype; fp32 dst is scattered into directly."""
    N, d = g.shape
    D = dst.shape[0]
    P = token_bytes.shape[1]
    bvec = torch.zeros(d, dtype=torch.float32, device=g.device)
    direct = dst.dtype == torch.float32
    if direct:
        target = dst if accumulate else dst.zero_()
    else:
        target = torch.zeros(D, d, dtype=torch.float32, device=g.device)
    if N:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
        _scatter_kernel[grid](
            ids,
            token_bytes,
            token_lengths,
            alpha32,
            beta32,
            g,
            target,
            bvec,
            N,
            d,
            g.stride(0),
            g.stride(1),
            target.stride(0),
            target.stride(1),
            P=P,
        )
    if direct:
        _finalize(None, bvec, dst, accumulate=True)  # dst already holds [old +] scattered part
    else:
        _finalize(target, bvec, dst, accumulate=accumulate)


# ------------------------------------------------------------------------------------------
# backward, deterministic: sorted pairs, fixed summation order, no host synchronisation
# ------------------------------------------------------------------------------------------
# Every constant here fixes a summation order: never autotune these kernels.
DET_BLOCK_D = 128
DET_PAIRS = 32  # pairs of one row summed per step (tl.sum over a tile)
DET_VECTOR_ROWS = INTERPRET  # the interpreter's order (see _row_sum_kernel)
DET_ROWS = 64 if INTERPRET else 4  # rows per program (a divisor of 256, so of D = 256 P)
DET_TOKENS = 64 if INTERPRET else 1024  # tokens per partial of b
DET_BLOCK_N = 16 if INTERPRET else 64


@triton.jit
def _pair_keys_kernel(
    ids_ptr,
    bytes_ptr,
    lengths_ptr,
    alpha_ptr,
    key_ptr,
    coef_ptr,
    N,
    D,
    P: tl.constexpr,
    P2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """key[t, p] = b_{t,p} * P + p for p < L_t, else D (sorts after every row); coef[t] = alpha(L_t)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    pos = tl.arange(0, P2)
    n_mask = offs_n < N
    ids = tl.load(ids_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    L = tl.load(lengths_ptr + ids, mask=n_mask, other=0).to(tl.int32)
    tl.store(coef_ptr + offs_n, tl.load(alpha_ptr + L, mask=n_mask, other=0.0), mask=n_mask)
    mask = n_mask[:, None] & (pos < P)[None, :]
    byte = tl.load(bytes_ptr + ids[:, None] * P + pos[None, :], mask=mask, other=0).to(tl.int32)
    key = tl.where(pos[None, :] < L[:, None], byte * P + pos[None, :], D)
    tl.store(key_ptr + offs_n[:, None] * P + pos[None, :], key, mask=mask)


@triton.jit
def _beta_partial_kernel(
    ids_ptr,
    lengths_ptr,
    beta_ptr,
    g_ptr,
    partial_ptr,
    N,
    d,
    stride_gn,
    stride_gc,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """partial[c] = sum over tokens c*TOKENS .. (c+1)*TOKENS - 1 of beta(L_t) g_t, in a fixed order."""
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, TOKENS, BLOCK_N):
        offs_n = c * TOKENS + i + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < N
        ids = tl.load(ids_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        L = tl.load(lengths_ptr + ids, mask=n_mask, other=0).to(tl.int32)
        beta = tl.load(beta_ptr + L, mask=n_mask, other=0.0)
        g = tl.load(
            g_ptr + offs_n[:, None] * stride_gn + cols[None, :] * stride_gc,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g * beta[:, None], axis=0)
    tl.store(partial_ptr + c * d + cols, acc, mask=d_mask)


@triton.jit
def _row_sum_kernel(
    row_start_ptr,
    order_ptr,
    coef_ptr,
    g_ptr,
    bvec_ptr,
    dst_ptr,
    d,
    stride_gn,
    stride_gc,
    stride_dr,
    stride_dc,
    P: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ROWS: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VECTOR_ROWS: tl.constexpr,
):
    """dst[row] = [dst[row] +] (sum of the row's pairs, in sorted order) + b, for ROWS rows.

    Two fixed orders, chosen by the constexpr VECTOR_ROWS (each deterministic on its own):
    - False (GPU): one row at a time, PAIRS of its pairs per step (a [PAIRS, BLOCK_D] tile summed with
      tl.sum): a row hit by half the tokens (a space at position 0) takes count / PAIRS steps;
    - True (the CPU interpreter, whose cost is per operation): the ROWS rows side by side, one pair of
      each per step, summed left to right.
    """
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = cols < d
    b = tl.load(bvec_ptr + cols, mask=d_mask, other=0.0)
    if VECTOR_ROWS:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        start = tl.load(row_start_ptr + rows)
        count = tl.load(row_start_ptr + rows + 1) - start
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for k in range(0, tl.max(count, axis=0)):
            k_mask = k < count
            token = tl.load(order_ptr + start + k, mask=k_mask, other=0) // P
            coef = tl.load(coef_ptr + token, mask=k_mask, other=0.0)
            g = tl.load(
                g_ptr + token[:, None] * stride_gn + cols[None, :] * stride_gc,
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += g * coef[:, None]
        out = acc + b[None, :]
        dst = dst_ptr + rows[:, None] * stride_dr + cols[None, :] * stride_dc
        if ACCUMULATE:
            out += tl.load(dst, mask=d_mask[None, :], other=0.0).to(tl.float32)
        tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=d_mask[None, :])
    else:
        for r in range(0, ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            start = tl.load(row_start_ptr + row)
            end = tl.load(row_start_ptr + row + 1)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for i in range(start, end, PAIRS):
                k = i + tl.arange(0, PAIRS).to(tl.int64)
                k_mask = k < end
                token = tl.load(order_ptr + k, mask=k_mask, other=0) // P  # pair index = token * P + pos
                coef = tl.load(coef_ptr + token, mask=k_mask, other=0.0)
                g = tl.load(
                    g_ptr + token[:, None] * stride_gn + cols[None, :] * stride_gc,
                    mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += tl.sum(g * coef[:, None], axis=0)
            out = acc + b
            dst = dst_ptr + row * stride_dr + cols * stride_dc
            if ACCUMULATE:
                out += tl.load(dst, mask=d_mask, other=0.0).to(tl.float32)
            tl.store(dst, out.to(dst_ptr.dtype.element_ty), mask=d_mask)


def _deterministic_dw(ids, token_bytes, token_lengths, alpha32, beta32, g, dst, accumulate: bool):
    """dst (= or +=) dW without atomics and without host synchronisation: every size is a function of
    (N, P, d), every summation order fixed, so two runs are bitwise equal."""
    N, d = g.shape
    D = dst.shape[0]
    P = token_bytes.shape[1]
    dev = g.device
    assert D % DET_ROWS == 0, (D, DET_ROWS)
    key = torch.empty(N * P, dtype=torch.int32, device=dev)  # [N, P] cells, D: no row
    coef = torch.empty(N, dtype=torch.float32, device=dev)  # alpha(L_t)
    if N:
        _pair_keys_kernel[(triton.cdiv(N, DET_BLOCK_N),)](
            ids,
            token_bytes,
            token_lengths,
            alpha32,
            key,
            coef,
            N,
            D,
            P=P,
            P2=triton.next_power_of_2(P),
            BLOCK_N=DET_BLOCK_N,
        )
    sorted_key, order = torch.sort(key, stable=True)  # stable: token order within a row
    row_start = torch.searchsorted(sorted_key, torch.arange(D + 1, device=dev, dtype=torch.int32))
    chunks = max(1, triton.cdiv(N, DET_TOKENS))
    partial = torch.empty(chunks, d, dtype=torch.float32, device=dev)
    grid = (chunks, triton.cdiv(d, DET_BLOCK_D))
    _beta_partial_kernel[grid](
        ids,
        token_lengths,
        beta32,
        g,
        partial,
        N,
        d,
        g.stride(0),
        g.stride(1),
        TOKENS=DET_TOKENS,
        BLOCK_N=DET_BLOCK_N,
        BLOCK_D=DET_BLOCK_D,
    )
    bvec = partial.sum(0)  # fixed shape: fixed order
    grid = (D // DET_ROWS, triton.cdiv(d, DET_BLOCK_D))
    _row_sum_kernel[grid](
        row_start,
        order,
        coef,
        g,
        bvec,
        dst,
        d,
        g.stride(0),
        g.stride(1),
        dst.stride(0),
        dst.stride(1),
        P=P,
        ACCUMULATE=accumulate,
        ROWS=DET_ROWS,
        PAIRS=DET_PAIRS,
        BLOCK_D=DET_BLOCK_D,
        VECTOR_ROWS=DET_VECTOR_ROWS,
    )


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------
def _check_main_grad(main_grad, weight):
    if main_grad is None:
        return
    if (
        tuple(main_grad.shape) != tuple(weight.shape)
        or not main_grad.dtype.is_floating_point
        or main_grad.device != weight.device
    ):
        raise ValueError(
            f"main_grad must be a floating tensor shaped like the weight {tuple(weight.shape)} on "
            f"{weight.device}, got {main_grad.dtype} {tuple(main_grad.shape)} on {main_grad.device}"
        )


class KroneckerEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, ids, token_bytes, token_lengths, weight, alpha, beta, deterministic=None, main_grad=None, cache_colsum=True
    ):
        ids = ids.reshape(-1).contiguous()  # a no-op for the sequence-parallel slice (contiguous)
        N = ids.numel()
        D, d = weight.shape
        P = token_bytes.shape[1]
        if D != 256 * P:
            raise ValueError(f"weight has {D} rows; the codec of a {P}-byte table needs 256 * {P} = {256 * P}")
        _check_main_grad(main_grad, weight)
        alpha32 = alpha.to(device=weight.device, dtype=torch.float32).contiguous()
        beta32 = beta.to(device=weight.device, dtype=torch.float32).contiguous()
        colsum = cached_colsum(weight) if cache_colsum else weight.detach().sum(0, dtype=torch.float32)
        out = torch.empty(N, d, dtype=weight.dtype, device=weight.device)
        if N:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
            _forward_kernel[grid](
                ids,
                token_bytes,
                token_lengths,
                alpha32,
                beta32,
                weight,
                colsum,
                out,
                N,
                d,
                weight.stride(0),
                weight.stride(1),
                out.stride(0),
                out.stride(1),
                P=P,
            )
        ctx.save_for_backward(ids, token_bytes, token_lengths, alpha32, beta32)
        ctx.weight_meta = (D, d, weight.dtype)
        ctx.deterministic = deterministic
        ctx.main_grad = main_grad
        # megatron's DDP marks its parameters with grad_added_to_main_grad and expects a (dummy) gradient
        ctx.megatron_param = weight if main_grad is not None and hasattr(weight, "grad_added_to_main_grad") else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, token_bytes, token_lengths, alpha32, beta32 = ctx.saved_tensors
        D, d, dtype = ctx.weight_meta
        N = ids.numel()
        g = grad_out.reshape(N, d)
        deterministic = ctx.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        main_grad = ctx.main_grad
        dst = main_grad if main_grad is not None else torch.empty(D, d, dtype=dtype, device=g.device)
        backward = _deterministic_dw if deterministic else _fast_dw
        backward(ids, token_bytes, token_lengths, alpha32, beta32, g, dst, accumulate=main_grad is not None)
        if main_grad is None:
            return None, None, None, dst, None, None, None, None, None
        param = ctx.megatron_param
        if param is None:
            return None, None, None, None, None, None, None, None, None
        # megatron-core's protocol (LinearWithGradAccumulationAndAsyncCommunication): the gradient is in
        # main_grad already; hand autograd a dummy so DDP's hook fires and skips adding it again
        param.grad_added_to_main_grad = True
        make = torch.zeros if getattr(param, "zero_out_wgrad", False) else torch.empty
        return None, None, None, make(D, d, dtype=dtype, device=g.device), None, None, None, None, None


def kronecker_embedding_triton(
    ids, token_bytes, token_lengths, weight, alpha, beta, deterministic=None, main_grad=None, cache_colsum=True
):
    """[N] ids -> [N, d] embeddings with the fused kernels; `weight` may be a column slice.

    deterministic: None follows torch.are_deterministic_algorithms_enabled(); True/False forces it.
    main_grad: a float tensor shaped like `weight` (megatron's fp32 `param.main_grad`): backward adds
        dW into it (no [D, d] temporary for an fp32 main_grad) and gives `weight` no gradient (None; a
        dummy under megatron's DDP, which marks the parameter `grad_added_to_main_grad`).
    cache_colsum: reuse colsum(W) until the optimizer (or an in-place write) changes W; see cached_colsum.
    """
    return KroneckerEmbeddingFunction.apply(
        ids, token_bytes, token_lengths, weight, alpha, beta, deterministic, main_grad, cache_colsum
    )
