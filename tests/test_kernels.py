"""Fused Triton kernels (kronecker_scale.kernels) against a straightforward fp64 torch reference of
the codec, written out here from its definition (DESIGN.md §2), forward and backward.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before the kernels
are defined); shapes stay tiny because the interpreter costs ~10 ms per program instance.
"""
import math

import pytest
import torch

from kronecker_scale.embedding import ByteTable, KroneckerEmbedding, codec_dim, scale_tables

kernels = pytest.importorskip("kronecker_scale.kernels")
HAS_CUDA = torch.cuda.is_available()       # without one, conftest chose the interpreter (TRITON_INTERPRET=1)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# per-dtype tolerance relative to the output scale; the interpreter stores bf16 by truncation (1 ulp)
TOL = {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
WORDS = "the quick brown fox jumps over the lazy dog , naïve café 日本語 🙂 running RUN".split()


def make_table(pos_dim, n_random=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = [w.encode() for w in WORDS] + [b"", b"-" * 50]
    for _ in range(n_random):                          # random byte strings cover all byte values
        n = int(torch.randint(0, pos_dim + 1, (1,), generator=g))
        tokens.append(bytes(torch.randint(0, 256, (n,), generator=g).tolist()))
    return ByteTable.from_token_bytes(tokens, pos_dim=pos_dim).pad_to(8)   # padded rows: L = 0


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
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)   # torch.std: unbiased
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
    out = kernels.kronecker_embedding_triton(ids, table.bytes.to(DEVICE), table.lengths.to(DEVICE), w,
                                             alpha.to(DEVICE), beta.to(DEVICE), deterministic=deterministic)
    out.backward(grad)
    return out, w.grad


def check(table, d, dtype, deterministic, n_tokens=37, **flags):
    g = torch.Generator().manual_seed(d)
    ids = torch.randint(0, table.vocab_size, (n_tokens,), generator=g)       # 37: not a multiple of any block
    ids[:3] = torch.tensor([WORDS.index("the"), len(WORDS), table.vocab_size - 1])   # L = 0 rows included
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


@pytest.mark.parametrize("flags", [dict(z_normalize=False), dict(length_normalize=False),
                                   dict(length_normalize=False, z_normalize=False)])
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
    monkeypatch.setattr(kmod, "_deterministic_dw", lambda *a: calls.append(1) or real(*a))
    table = make_table(16)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        check(table, 8, torch.float32, deterministic=None, n_tokens=9)
        assert calls == [1]
        torch.use_deterministic_algorithms(False)
        check(table, 8, torch.float32, deterministic=None, n_tokens=9)
        assert calls == [1]                               # fast (atomic) path when the flag is off
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
