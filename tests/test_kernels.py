"""Fused Triton kernels (kronecker_scale.kernels) against a straightforward fp64 torch reference of
the codec, written out here from its definition (docs/design.md §2), forward and backward.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before the kernels
are defined); shapes stay tiny because the interpreter costs ~10 ms per program instance.
"""

import math

import pytest
import torch

from kronecker_scale.embedding import ByteTable, KroneckerEmbedding, codec_dim, scale_tables

kernels = pytest.importorskip("kronecker_scale.kernels")
HAS_CUDA = torch.cuda.is_available()  # without one, conftest chose the interpreter (TRITON_INTERPRET=1)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# per-dtype tolerance relative to the output scale; the interpreter stores bf16 by truncation (1 ulp)
TOL = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
WORDS = "the quick brown fox jumps over the lazy dog , naïve café 日本語 🙂 running RUN".split()


def make_table(pos_dim, n_random=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [w.encode() for w in WORDS] + [b"", b"-" * 50]
    for _ in range(n_random):  # random byte strings cover all byte values
        n = int(torch.randint(0, pos_dim + 1, (1,), generator=g))
        tokens.append(bytes(torch.randint(0, 256, (n,), generator=g).tolist()))
    return ByteTable.from_token_bytes(tokens, pos_dim=pos_dim).pad_to(8)  # padded rows: L = 0


def reference_code(token_bytes, lengths, length_normalize=True, z_normalize=True, eps=1e-6):
    """The code x of each token, in fp64, from the definition: x = s(L) * sum_{p<L} onehot(b_p * P + p)
    with s(L) = 1/sqrt(L) (1 without length normalisation), then (x - mean) / (unbiased std + eps)."""
    N, P = token_bytes.shape
    x = torch.zeros(N, 256 * P, dtype=torch.float64)
    for t in range(N):
        L = int(lengths[t])
        for p in range(L):
            x[t, int(token_bytes[t, p]) * P + p] += 1 / math.sqrt(L) if length_normalize else 1.0
    if z_normalize:
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)  # torch.std: unbiased
    return x


def reference(table, ids, weight64, grad64, **flags):
    """e = x @ W and dL/dW = x^T g, in fp64 (autograd through the one matmul)."""
    x = reference_code(table.bytes[ids.cpu()], table.lengths[ids.cpu()], **flags)
    w = weight64.detach().cpu().clone().requires_grad_(True)
    out = x @ w
    out.backward(grad64.cpu())
    return out.detach(), w.grad


def run_triton(table, ids, weight, grad, deterministic, **flags):
    alpha, beta = scale_tables(table.pos_dim, **flags)
    w = weight.detach().clone().requires_grad_(True)
    out = kernels.kronecker_embedding_triton(
        ids,
        table.bytes.to(DEVICE),
        table.lengths.to(DEVICE),
        w,
        alpha.to(DEVICE),
        beta.to(DEVICE),
        deterministic=deterministic,
    )
    out.backward(grad)
    return out, w.grad


def check(table, d, dtype, deterministic, n_tokens=37, **flags):
    g = torch.Generator().manual_seed(d)
    ids = torch.randint(0, table.vocab_size, (n_tokens,), generator=g)  # 37: not a multiple of any block
    ids[:3] = torch.tensor([WORDS.index("the"), len(WORDS), table.vocab_size - 1])  # L = 0 rows included
    weight = (torch.randn(codec_dim(table.pos_dim), d, generator=g) / 64).to(dtype)
    grad = torch.randn(n_tokens, d, generator=g).to(dtype)
    out, dw = run_triton(table, ids.to(DEVICE), weight.to(DEVICE), grad.to(DEVICE), deterministic, **flags)
    ref_out, ref_dw = reference(table, ids, weight.double(), grad.double(), **flags)
    assert out.dtype == dtype and dw.dtype == dtype and out.shape == (n_tokens, d)
    tol = TOL[dtype]
    assert (out.cpu().double() - ref_out).abs().max() <= tol * ref_out.abs().max()
    assert (dw.cpu().double() - ref_dw).abs().max() <= tol * ref_dw.abs().max()
    assert torch.all(out[1:3] == 0)
    return out, dw


@pytest.mark.parametrize("pos_dim", [16, 32])
@pytest.mark.parametrize("d", [1, 24, 96, 130])
def test_forward_and_dw_fp32(d, pos_dim):
    check(make_table(pos_dim), d, torch.float32, deterministic=False)


@pytest.mark.parametrize(
    "flags", [dict(z_normalize=False), dict(length_normalize=False), dict(length_normalize=False, z_normalize=False)]
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_forward_and_dw_without_normalisations(flags, deterministic):
    check(make_table(16), 24, torch.float32, deterministic, **flags)


def test_reference_code_by_hand():
    # token "ab" at P = 4: cells (97, 0) and (98, 1) hold 1/sqrt(2) before z-normalisation
    x = reference_code(torch.tensor([[97, 98, 0, 0]], dtype=torch.uint8), torch.tensor([2]), z_normalize=False)
    assert x.sum() == pytest.approx(2 / math.sqrt(2)) and x[0, 97 * 4] == x[0, 98 * 4 + 1] == 1 / math.sqrt(2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_no_tokens(deterministic):
    table = make_table(16)
    weight = torch.randn(codec_dim(16), 8, device=DEVICE)
    ids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out, dw = run_triton(table, ids, weight, torch.zeros(0, 8, device=DEVICE), deterministic)
    assert out.shape == (0, 8) and dw.shape == weight.shape and torch.all(dw == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_half_precision(dtype, deterministic):
    check(make_table(16), 24, dtype, deterministic)


@pytest.mark.parametrize("d,pos_dim", [(24, 32), (130, 16)])
def test_deterministic_backward_is_bitwise_reproducible_and_correct(d, pos_dim):
    table = make_table(pos_dim)
    _, dw1 = check(table, d, torch.float32, deterministic=True)
    _, dw2 = check(table, d, torch.float32, deterministic=True)
    assert torch.equal(dw1, dw2)


def test_torch_deterministic_algorithms_select_the_deterministic_backward(monkeypatch):
    import kronecker_scale.kernels.kronecker_embedding as kmod

    calls = []
    real = kmod._deterministic_dw
    monkeypatch.setattr(kmod, "_deterministic_dw", lambda *a, **k: calls.append(1) or real(*a, **k))
    table = make_table(16)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        check(table, 8, torch.float32, deterministic=None, n_tokens=9)
        assert calls == [1]
        torch.use_deterministic_algorithms(False)
        check(table, 8, torch.float32, deterministic=None, n_tokens=9)
        assert calls == [1]  # fast (atomic) path when the flag is off
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("deterministic", [False, True])
def test_column_slice_and_token_subset_without_copies(deterministic):
    # the tensor-parallel shard is a column view of the projection; the sequence-parallel part a view of the ids
    table = make_table(16)
    alpha, beta = scale_tables(16)
    full = torch.randn(codec_dim(16), 40, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, table.vocab_size, (30,), device=DEVICE)
    part_ids, part_w = ids[7:23], full[:, 9:33]
    assert not part_w.is_contiguous() and part_ids.data_ptr() == ids.data_ptr() + 7 * ids.element_size()
    tb, tl_ = table.bytes.to(DEVICE), table.lengths.to(DEVICE)
    out = kernels.kronecker_embedding_triton(part_ids, tb, tl_, part_w, alpha, beta, deterministic=deterministic)
    g = torch.randn_like(out)
    out.backward(g)
    g_full = torch.zeros(30, 40, dtype=torch.float64)
    g_full[7:23, 9:33] = g.cpu().double()
    ref, ref_dw = reference(table, ids, full.double(), g_full)
    assert torch.allclose(out.cpu().double(), ref[7:23, 9:33], rtol=0, atol=1e-5 * ref.abs().max().item())
    assert torch.allclose(full.grad.cpu().double(), ref_dw, rtol=0, atol=1e-5 * ref_dw.abs().max().item())
    assert torch.all(full.grad[:, :9] == 0) and torch.all(full.grad[:, 33:] == 0)


def test_module_impl_triton_matches_the_reference():
    table = make_table(32)
    emb = KroneckerEmbedding(table, 20, impl="triton", deterministic=True).to(DEVICE)
    assert emb.resolved_impl() == "triton"
    ids = torch.randint(0, table.vocab_size, (2, 9), device=DEVICE)
    out = emb(ids)
    assert out.shape == (2, 9, 20)
    g = torch.randn_like(out)
    out.backward(g)
    ref, ref_dw = reference(table, ids.reshape(-1), emb.weight.double(), g.reshape(-1, 20).double())
    assert torch.allclose(out.detach().cpu().double().reshape(-1, 20), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    assert torch.allclose(emb.weight.grad.cpu().double(), ref_dw, rtol=0, atol=1e-5 * ref_dw.abs().max().item())


# --- the backward at the byte floor: b broadcast, main_grad, determinism, int64 offsets, colsum cache ---
def fp64_beta_vector(table, ids, grad64, **flags):
    """b = sum_t beta(L_t) g_t in fp64: what every row of dW gets on top of its scattered part."""
    _, beta = scale_tables(table.pos_dim, **flags)
    return (beta[table.lengths[ids.cpu()].long()][:, None] * grad64.cpu()).sum(0)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_no_token_touches_get_exactly_the_beta_broadcast(deterministic, dtype):
    table = make_table(16)
    ids = torch.tensor([0, 1, 2, 3, 3, 5])
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(codec_dim(16), 24, generator=g) / 64).to(dtype)
    grad = torch.randn(6, 24, generator=g).to(dtype)
    _, dw = run_triton(table, ids.to(DEVICE), weight.to(DEVICE), grad.to(DEVICE), deterministic)
    b = fp64_beta_vector(table, ids, grad.double())
    touched = set()
    for t in ids.tolist():
        for p in range(int(table.lengths[t])):
            touched.add(int(table.bytes[t, p]) * 16 + p)
    untouched = torch.tensor(sorted(set(range(codec_dim(16))) - touched))
    rest = dw.cpu()[untouched]
    assert torch.equal(rest, rest[:1].expand_as(rest))  # one broadcast vector, identical in every row
    assert (rest[0].double() - b).abs().max() <= TOL[dtype] * b.abs().max()
    assert b.abs().max() > 0
    # without z-normalisation beta = 0: untouched rows are exactly zero
    _, dw0 = run_triton(table, ids.to(DEVICE), weight.to(DEVICE), grad.to(DEVICE), deterministic, z_normalize=False)
    assert torch.all(dw0.cpu()[untouched] == 0)


def run_into_main_grad(table, ids, weight, grad, deterministic, main_grad, megatron=False):
    alpha, beta = scale_tables(table.pos_dim)
    w = weight.detach().clone().requires_grad_(True)
    if megatron:
        w.grad_added_to_main_grad = False  # what megatron's DDP sets on its parameters
    out = kernels.kronecker_embedding_triton(
        ids,
        table.bytes.to(DEVICE),
        table.lengths.to(DEVICE),
        w,
        alpha.to(DEVICE),
        beta.to(DEVICE),
        deterministic=deterministic,
        main_grad=main_grad,
    )
    out.backward(grad)
    return w


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
)
def test_main_grad_accumulates_dw_and_leaves_no_weight_grad(deterministic, dtype, grad_dtype):
    table = make_table(16)
    g = torch.Generator().manual_seed(5)
    n, d = 29, 40
    ids = torch.randint(0, table.vocab_size, (n,), generator=g)
    weight = (torch.randn(codec_dim(16), d, generator=g) / 64).to(dtype)
    grad = torch.randn(n, d, generator=g).to(dtype)
    start = torch.randn(codec_dim(16), d, generator=g).to(grad_dtype)  # gradients of earlier micro-batches
    main_grad = start.clone().to(DEVICE)
    w = run_into_main_grad(table, ids.to(DEVICE), weight.to(DEVICE), grad.to(DEVICE), deterministic, main_grad)
    assert w.grad is None
    _, ref_dw = reference(table, ids, weight.double(), grad.double())
    expected = start.double() + ref_dw
    tol = TOL[grad_dtype] if grad_dtype != torch.float32 else TOL[dtype]
    assert (main_grad.cpu().double() - expected).abs().max() <= tol * expected.abs().max()
    # megatron's protocol: the parameter is marked and gets a dummy gradient, so DDP's hook fires and skips it
    main_grad2 = start.clone().to(DEVICE)
    w2 = run_into_main_grad(
        table, ids.to(DEVICE), weight.to(DEVICE), grad.to(DEVICE), deterministic, main_grad2, megatron=True
    )
    assert w2.grad_added_to_main_grad is True and w2.grad is not None and w2.grad.shape == w2.shape
    if deterministic:
        assert torch.equal(main_grad, main_grad2)


def test_module_gradient_accumulation_fusion_adds_into_main_grad():
    table = make_table(16)
    emb = KroneckerEmbedding(table, 10, impl="triton", gradient_accumulation_fusion=True).to(DEVICE)
    emb.weight.main_grad = torch.ones(codec_dim(16), 10, device=DEVICE)  # what megatron's DDP attaches
    ids = torch.randint(0, table.vocab_size, (7,), device=DEVICE)
    out = emb(ids)
    g = torch.randn_like(out)
    out.backward(g)
    _, ref_dw = reference(table, ids, emb.weight.double(), g.double())
    assert emb.weight.grad is None
    assert torch.allclose(emb.weight.main_grad.cpu().double(), 1 + ref_dw, rtol=0, atol=1e-5 * ref_dw.abs().max())


def test_main_grad_must_match_the_weight():
    table = make_table(16)
    alpha, beta = scale_tables(16)
    w = torch.randn(codec_dim(16), 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="main_grad"):
        kernels.kronecker_embedding_triton(
            torch.zeros(2, dtype=torch.int64, device=DEVICE),
            table.bytes.to(DEVICE),
            table.lengths.to(DEVICE),
            w,
            alpha,
            beta,
            main_grad=torch.zeros(codec_dim(16), 9, device=DEVICE),
        )


def test_deterministic_backward_gpu_order_is_correct_and_bitwise_reproducible(monkeypatch):
    # the order the compiled kernels use (one row at a time, DET_PAIRS pairs per step), run here too
    import kronecker_scale.kernels.kronecker_embedding as kmod

    monkeypatch.setattr(kmod, "DET_VECTOR_ROWS", False)
    monkeypatch.setattr(kmod, "DET_ROWS", 256)
    monkeypatch.setattr(kmod, "DET_PAIRS", 4)  # several steps per row at these sizes
    table = make_table(4)
    _, dw1 = check(table, 20, torch.float32, deterministic=True, n_tokens=40)
    _, dw2 = check(table, 20, torch.float32, deterministic=True, n_tokens=40)
    assert torch.equal(dw1, dw2)


def huge_virtual_buffer(elements, dtype):
    """A buffer past 2^31 elements that costs only the pages touched (CPU: lazily backed by the kernel)."""
    try:
        return torch.empty(elements, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve {elements * 2 / 2**30:.0f} GiB of address space here: {e}")


@pytest.mark.parametrize("deterministic", [False, True])
def test_offsets_past_2_31_elements_are_int64(deterministic):
    # W's column stride and g's row stride are 2^30 + 16 elements, so column / token 2 sits 2^31 + 32
    # elements in: in int32 that offset wraps to -2^31 + 32, i.e. 2^32 elements *before* the view, which
    # starts 2^31 + 2^20 elements into the buffer. The wrapped address lands in a region filled with 7s.
    table = make_table(4)
    P, D, d, n = 4, codec_dim(4), 3, 3
    S = 2**30 + 16
    start = 2**32 + 2**20
    buf = huge_virtual_buffer(start + 2 * S + 4096, torch.float16)
    buf[: 2**20].fill_(7.0)
    buf[2**32 : start].fill_(7.0)
    view = buf[start:]
    g = torch.Generator().manual_seed(0)
    w_src = (torch.randn(D, d, generator=g) / 8).half()
    grad_src = torch.randn(n, d, generator=g).half()
    weight = view.as_strided((D, d), (1, S))  # column c at c * S
    weight.copy_(w_src.to(DEVICE))
    grad = view.as_strided((n, d), (S, 1), storage_offset=start + D + 64)  # token t at t * S (past W's column)
    grad.copy_(grad_src.to(DEVICE))
    ids = torch.tensor([WORDS.index("the"), WORDS.index("fox"), 0], device=DEVICE)
    alpha, beta = scale_tables(P)
    w = weight.detach().requires_grad_(True)
    out = kernels.kronecker_embedding_triton(
        ids,
        table.bytes.to(DEVICE),
        table.lengths.to(DEVICE),
        w,
        alpha.to(DEVICE),
        beta.to(DEVICE),
        deterministic=deterministic,
    )
    out.backward(grad)
    ref_out, ref_dw = reference(table, ids.cpu(), w_src.double(), grad_src.double())
    assert (out.cpu().double() - ref_out).abs().max() <= TOL[torch.float16] * ref_out.abs().max()
    assert (w.grad.cpu().double() - ref_dw).abs().max() <= TOL[torch.float16] * ref_dw.abs().max()


def test_autotuning_is_pruned_to_a_few_configs_per_shape():
    import triton

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w)
        for bn, bd, w in kernels.kronecker_embedding.FORWARD_CONFIGS
    ]
    prune = kernels.kronecker_embedding.prune_configs
    assert len(configs) <= 6 and prune(configs, {"d": 4096}) == configs
    assert {c.kwargs["BLOCK_D"] for c in prune(configs, {"d": 64})} == {64}
    assert {c.kwargs["BLOCK_D"] for c in prune(configs, {"d": 130})} == {64, 128, 256}
    assert [c.kwargs["BLOCK_D"] for c in prune(configs, {"d": 1})] == [64]


def test_colsum_is_computed_once_per_optimizer_step_not_per_micro_batch():
    kmod = kernels.kronecker_embedding
    table = make_table(16)
    emb = KroneckerEmbedding(table, 12, impl="triton").to(DEVICE)
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, fused=True)  # fused: writes W without bumping _version
    ids = torch.randint(0, table.vocab_size, (4, 5), device=DEVICE)
    stats = kmod.colsum_stats

    def micro_batch():
        before = dict(stats)
        out = emb(ids)
        out.backward(torch.ones_like(out))
        ref, _ = reference(table, ids.reshape(-1), emb.weight.double(), torch.zeros(20, 12, dtype=torch.float64))
        assert torch.allclose(out.detach().cpu().double().reshape(-1, 12), ref, rtol=0, atol=1e-5 * ref.abs().max())
        return stats["computed"] - before["computed"], stats["reused"] - before["reused"]

    assert micro_batch() == (1, 0)
    assert micro_batch() == (0, 1) and micro_batch() == (0, 1)  # gradient accumulation: S reused
    version = emb.weight._version
    opt.step()
    assert emb.weight._version == version  # only the step hook can tell W changed
    assert micro_batch() == (1, 0)  # and S follows the new W
    assert micro_batch() == (0, 1)
    with torch.no_grad():
        emb.weight.mul_(2.0)  # an in-place write outside the optimizer
    assert micro_batch() == (1, 0)
    kmod.clear_colsum_cache()
    assert micro_batch() == (1, 0)
    emb.weight.grad = None
    with torch.no_grad():  # cache_colsum=False never reuses
        alpha, beta = scale_tables(16)
        flat = ids.reshape(-1)
        before = stats["reused"]
        kernels.kronecker_embedding_triton(
            flat, emb.token_bytes, emb.token_lengths, emb.weight, alpha, beta, cache_colsum=False
        )
        assert stats["reused"] == before


@pytest.mark.skipif(not HAS_CUDA, reason="host synchronisations are observable on CUDA only")
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_makes_no_host_synchronisation(deterministic):
    table = make_table(32)
    alpha, beta = scale_tables(32)
    w = torch.randn(codec_dim(32), 256, device="cuda", requires_grad=True)
    ids = torch.randint(0, table.vocab_size, (300,), device="cuda")
    tb, tl_ = table.bytes.cuda(), table.lengths.cuda()
    alpha, beta = alpha.cuda(), beta.cuda()
    grad = torch.randn(300, 256, device="cuda")
    kernels.kronecker_embedding_triton(ids, tb, tl_, w, alpha, beta, deterministic=deterministic).backward(grad)
    torch.cuda.synchronize()  # autotuning (which syncs) is done
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.kronecker_embedding_triton(ids, tb, tl_, w, alpha, beta, deterministic=deterministic).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
