"""The closed form (docs/design.md §2) against the materialised reference codec, in fp64."""

import itertools
import math

import numpy as np
import pytest
import torch

from kronecker_scale.embedding import codec_dim, dense_codec, kronecker_embed_dense, kronecker_embed_torch, scale_tables
from tests.conftest import random_bytes_and_lengths

FLAGS = list(itertools.product([True, False], [True, False]))  # (length_normalize, z_normalize)


def test_dense_codec_matches_a_hand_computed_code():
    # token "ab" at P=4: cells (97, 0) and (98, 1) hold 1/sqrt(2); z-norm uses the unbiased std + eps
    P, D = 4, codec_dim(4)
    x = dense_codec(torch.tensor([[97, 98, 0, 0]], dtype=torch.uint8), torch.tensor([2]), dtype=torch.float64)[0]
    ref = np.zeros(D)
    ref[97 * P + 0] = ref[98 * P + 1] = 1 / math.sqrt(2)
    ref = (ref - ref.mean()) / (ref.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pos_dim", [16, 32])
@pytest.mark.parametrize("length_normalize,z_normalize", FLAGS)
def test_closed_form_equals_dense_for_every_length(pos_dim, length_normalize, z_normalize):
    table, lengths = random_bytes_and_lengths(3, pos_dim)
    weight = torch.randn(codec_dim(pos_dim), 24, dtype=torch.float64)
    alpha, beta = scale_tables(pos_dim, length_normalize=length_normalize, z_normalize=z_normalize)
    fast = kronecker_embed_torch(table, lengths, weight, alpha, beta)
    ref = kronecker_embed_dense(
        table, lengths, weight, length_normalize=length_normalize, z_normalize=z_normalize, eps=1e-6
    )
    scale = ref.abs().max()
    assert scale > 0
    assert (fast - ref).abs().max() <= 1e-9 * scale
    # empty tokens embed to exactly zero in both
    assert torch.all(fast[lengths == 0] == 0) and torch.all(ref[lengths == 0] == 0)


@pytest.mark.parametrize("length_normalize,z_normalize", FLAGS)
def test_closed_form_gradient_equals_dense_gradient(length_normalize, z_normalize):
    pos_dim = 16
    table, lengths = random_bytes_and_lengths(2, pos_dim)
    g = torch.randn(len(lengths), 7, dtype=torch.float64)
    grads = []
    for impl in ("torch", "dense"):
        w = torch.randn(codec_dim(pos_dim), 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        w.requires_grad_(True)
        if impl == "torch":
            alpha, beta = scale_tables(pos_dim, length_normalize=length_normalize, z_normalize=z_normalize)
            out = kronecker_embed_torch(table, lengths, w, alpha, beta)
        else:
            out = kronecker_embed_dense(
                table, lengths, w, length_normalize=length_normalize, z_normalize=z_normalize, eps=1e-6
            )
        (out * g).sum().backward()
        grads.append(w.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-9 * grads[1].abs().max()


def test_torch_path_gradcheck_fp64():
    pos_dim = 2  # D = 512 keeps the numerical Jacobian small
    table = torch.tensor([[1, 2], [255, 0], [7, 9], [0, 0]], dtype=torch.uint8)
    lengths = torch.tensor([2, 1, 2, 0])
    alpha, beta = scale_tables(pos_dim)
    w = torch.randn(codec_dim(pos_dim), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: kronecker_embed_torch(table, lengths, w, alpha, beta), (w,))


def test_scale_tables_match_the_closed_form_of_the_moments():
    # mu = sqrt(L)/D, sigma = sqrt((1 - L/D)/(D - 1)) + eps with length normalisation (paper.md §2.2)
    P, D, eps = 32, codec_dim(32), 1e-6
    alpha, beta = scale_tables(P)
    for L in (1, 5, 32):
        sigma = math.sqrt((1 - L / D) / (D - 1)) + eps
        assert alpha[L].item() == pytest.approx(1 / math.sqrt(L) / sigma, rel=1e-12)
        assert beta[L].item() == pytest.approx(-math.sqrt(L) / D / sigma, rel=1e-12)
    assert alpha[0] == 0 and beta[0] == 0


def test_bf16_is_within_bf16_tolerance_of_fp32():
    pos_dim = 32
    table, lengths = random_bytes_and_lengths(4, pos_dim)
    w32 = torch.randn(codec_dim(pos_dim), 64) / math.sqrt(codec_dim(pos_dim))
    alpha, beta = scale_tables(pos_dim)
    out32 = kronecker_embed_torch(table, lengths, w32, alpha, beta)
    w16 = w32.to(torch.bfloat16)
    out16 = kronecker_embed_torch(table, lengths, w16, alpha, beta)
    assert out16.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits: weight rounding (2^-9 relative) plus the output rounding
    ref16 = kronecker_embed_torch(table, lengths, w16.double(), alpha, beta)
    assert (out16.double() - ref16).abs().max() <= 2**-8 * ref16.abs().max()
    assert (out16.float() - out32).abs().max() <= 2**-6 * out32.abs().max()
