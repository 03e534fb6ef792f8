"""KroneckerEmbedding: nn.Embedding's contract, implementations agree, state dict, bad ids."""

import math
import sys

import pytest
import torch

from kronecker_scale.embedding import ByteTable, KroneckerEmbedding, codec_dim
from kronecker_scale.embedding.reference import dense_codec
from kronecker_scale.errors import KScaleError

WORDS = [b"", b"the", b" the", b"The", b"running", "naïve".encode(), "日本".encode(), b"x" * 40, b"a"]


def make(impl="torch", d=12, pos_dim=16, dtype=torch.float64, **kw):
    table = ByteTable.from_token_bytes(WORDS, pos_dim=pos_dim).pad_to(4)
    torch.manual_seed(0)
    return KroneckerEmbedding(table, d, impl=impl, dtype=dtype, **kw)


def test_shapes_attributes_and_init():
    emb = make(dtype=torch.float32, d=256, pos_dim=32)
    assert emb.weight.shape == (codec_dim(32), 256)
    assert (emb.num_embeddings, emb.embedding_dim) == (12, 256)
    assert [n for n, _ in emb.named_parameters()] == ["weight"]
    assert emb.weight.std().item() == pytest.approx(1 / math.sqrt(codec_dim(32)), rel=0.02)
    ids = torch.tensor([[1, 2, 3], [4, 5, 11]])
    assert emb(ids).shape == (2, 3, 256) and emb(ids).dtype == torch.float32


@pytest.mark.parametrize("flags", [dict(), dict(z_normalize=False), dict(length_normalize=False)])
def test_torch_and_dense_implementations_agree(flags):
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    a, b = make("torch", **flags), make("dense", **flags)
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a(ids), b(ids), rtol=0, atol=1e-10)
    assert a.resolved_impl() == "torch" and make("auto").resolved_impl() == "torch"  # no CUDA here


def test_equal_to_the_reference_codec_times_the_projection():
    emb = make()
    ids = torch.arange(12)
    x = dense_codec(emb.token_bytes[ids], emb.token_lengths[ids], dtype=torch.float64)
    assert torch.allclose(emb(ids), x @ emb.weight, atol=1e-10)
    assert torch.all(emb(torch.tensor([0, 9, 10, 11])) == 0)  # empty and padded ids embed to zero


@pytest.mark.parametrize("bad", [12, 50_000, -1])
def test_out_of_range_id_names_the_id_and_vocab_size(bad):
    emb = make()
    with pytest.raises(KScaleError) as e:
        emb(torch.tensor([[1, 2], [3, bad]]))
    msg = str(e.value)
    assert f"token id {bad}" in msg and "V=12" in msg and "(1, 1)" in msg


def test_float_ids_are_rejected():
    with pytest.raises(KScaleError, match="integer"):
        make()(torch.tensor([1.0]))


def test_byte_override_gives_any_string_an_embedding():
    emb = make()
    ids = torch.tensor([[1, 4, 8]])
    # overriding with the bytes of an in-vocabulary token reproduces that token's embedding
    out = emb.forward_with_byte_override(ids, {(0, 2): b"the"})
    assert torch.allclose(out[0, 2], emb(torch.tensor(1)), atol=1e-12)
    assert torch.allclose(out[0, :2], emb(ids)[0, :2], atol=1e-12)
    # an out-of-vocabulary string equals the reference codec of its bytes (truncated UTF-8-safely)
    oov = "kronekticus-日本語日本語".encode()
    out = emb.forward_with_byte_override(ids, {(0, 0): oov})
    cut = oov[:16].decode("utf-8", errors="ignore").encode()
    row = torch.zeros(1, 16, dtype=torch.uint8)
    row[0, : len(cut)] = torch.tensor(list(cut), dtype=torch.uint8)
    ref = dense_codec(row, torch.tensor([len(cut)]), dtype=torch.float64) @ emb.weight
    assert torch.allclose(out[0, 0], ref[0], atol=1e-10)
    with pytest.raises(KScaleError, match="outside ids"):
        emb.forward_with_byte_override(ids, {(3, 0): b"x"})


def test_state_dict_round_trip_and_fingerprint_check():
    a = make()
    sd = a.state_dict()
    assert set(sd) == {"weight", "token_bytes", "token_lengths", "_extra_state"}
    b = make()
    torch.nn.init.zeros_(b.weight)
    b.load_state_dict(sd)
    assert torch.equal(a.weight, b.weight)
    other_table = ByteTable.from_token_bytes([b"other", b"vocab"], pos_dim=16).pad_to(4)
    c = KroneckerEmbedding(other_table, 12, dtype=torch.float64)
    before = (c.weight.clone(), c.token_bytes.clone())
    with pytest.raises(KScaleError) as e:
        c.load_state_dict(sd)
    assert a.byte_table_fingerprint in str(e.value) and c.byte_table_fingerprint in str(e.value)
    assert torch.equal(c.weight, before[0]) and torch.equal(c.token_bytes, before[1])  # nothing overwritten


def test_bf16_weight_matches_fp32_within_bf16_tolerance():
    emb = make(dtype=torch.float32, d=64, pos_dim=32)
    ids = torch.arange(12)
    ref = emb(ids)
    emb16 = make(dtype=torch.bfloat16, d=64, pos_dim=32)
    emb16.weight.data.copy_(emb.weight.data)
    out = emb16(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2**-6 * ref.abs().max()
    out.float().sum().backward()
    assert emb16.weight.grad.dtype == torch.bfloat16


def test_unknown_impl_is_rejected():
    with pytest.raises(KScaleError, match="unknown embedding impl"):
        make("cuda")


def test_triton_asked_for_and_unusable_is_an_error_not_a_fallback(monkeypatch):
    emb = make("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor and no interpreter
    with pytest.raises(KScaleError, match="need a CUDA device"):
        emb(torch.tensor([1, 2]))
    monkeypatch.setitem(sys.modules, "kronecker_scale.kernels", None)  # a broken Triton install
    with pytest.raises(KScaleError, match="do not import"):
        emb.resolved_impl()


def test_auto_says_once_which_implementation_it_chose(capsys, monkeypatch):
    from kronecker_scale.embedding import kronecker_embedding as module

    monkeypatch.setattr(module, "_announced", set())
    emb = make("auto")
    emb(torch.tensor([1, 2]))
    emb(torch.tensor([3]))
    out = capsys.readouterr().out
    assert out.count("embedding: impl=auto chose the torch closed form on cpu (no CUDA device)") == 1
