"""ByteTable: truncation, padding, fingerprints, persistence and bad input."""

import random

import pytest
import torch

from kronecker_scale.embedding import ByteTable, utf8_safe_truncate
from kronecker_scale.errors import KScaleError
from kronecker_scale.tokenizer import load_tokenizer

CHARS = ["a", "Z", " ", "é", "ß", "€", "中", "日", "🙂", "𝄞", "\n"]  # 1-, 2-, 3- and 4-byte code points


def test_truncation_never_splits_a_code_point_and_keeps_as_much_as_fits():
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 20)))
        b = s.encode()
        limit = rng.randint(1, 40)
        cut = utf8_safe_truncate(b, limit)
        assert len(cut) <= limit and b.startswith(cut)
        cut.decode("utf-8")  # raises if a code point was split
        if len(cut) < len(b):  # maximal: the next whole character would not fit
            next_char = b[len(cut) :].decode("utf-8", errors="ignore")[:1].encode()
            assert len(cut) + len(next_char) > limit


def test_truncation_of_bytes_that_are_not_utf8_is_a_plain_cut():
    b = bytes([0x80] * 10)  # continuation bytes only: no code point to protect
    assert utf8_safe_truncate(b, 4) == b[:4]


def test_from_token_bytes_layout_and_stats():
    tokens = [b"", b"a", b"hello", "é中".encode(), b"x" * 40, b"x" * 41]
    t = ByteTable.from_token_bytes(tokens, pos_dim=8)
    assert t.bytes.dtype == torch.uint8 and t.bytes.shape == (6, 8)
    assert t.lengths.dtype == torch.int16 and t.lengths.tolist() == [0, 1, 5, 5, 8, 8]
    assert t.token(3) == "é中".encode() and t.token(4) == b"x" * 8
    s = t.stats()
    assert s.truncated == 2 and s.empty == 1
    assert s.colliding_ids == 2 and s.collision_groups == 1  # the two long x-runs collide once cut
    assert s.coverage == pytest.approx(4 / 6) and s.fits == pytest.approx(4 / 6)
    assert s.length_histogram == {0: 1, 1: 1, 5: 2, 8: 2}


def test_pad_to_adds_empty_rows_and_keeps_the_fingerprint():
    t = ByteTable.from_token_bytes([b"a", b"bc", b"def"], pos_dim=4)
    p = t.pad_to(8)
    assert p.vocab_size == 8 and p.num_token_ids == 3
    assert p.lengths[3:].tolist() == [0] * 5 and torch.all(p.bytes[3:] == 0)
    assert p.fingerprint == t.fingerprint
    assert t.pad_to(3) is t


def test_fingerprint_depends_on_content_and_settings():
    a = ByteTable.from_token_bytes([b"ab", b"c"], pos_dim=4)
    assert a.fingerprint == ByteTable.from_token_bytes([b"ab", b"c"], pos_dim=4).fingerprint
    assert a.fingerprint != ByteTable.from_token_bytes([b"ab", b"d"], pos_dim=4).fingerprint
    assert a.fingerprint != ByteTable.from_token_bytes([b"ab", b"c"], pos_dim=5).fingerprint
    assert a.fingerprint != ByteTable.from_token_bytes([b"ab", b"c"], pos_dim=4, byte_source="decode").fingerprint


def test_from_arrays_accepts_numpy_and_tensors():
    import numpy as np

    t = ByteTable.from_arrays(np.array([[104, 105], [0, 0]]), np.array([2, 0]), pos_dim=2)
    assert t.token(0) == b"hi" and t.vocab_size == 2
    t2 = ByteTable.from_arrays(torch.tensor([[104, 105], [0, 0]], dtype=torch.uint8), torch.tensor([2, 0]), 2)
    assert t2.fingerprint == t.fingerprint
    with pytest.raises(KScaleError, match="lengths must lie in 0..2"):
        ByteTable.from_arrays(np.zeros((2, 2)), np.array([3, 0]), pos_dim=2)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    t = ByteTable.from_token_bytes([b"alpha", "β".encode(), b""], pos_dim=16).pad_to(4)
    path = t.save(tmp_path / "byte_table.safetensors")
    u = ByteTable.load(path, expected_fingerprint=t.fingerprint)
    assert torch.equal(u.bytes, t.bytes) and torch.equal(u.lengths, t.lengths)
    assert (u.fingerprint, u.num_token_ids, u.pos_dim, u.byte_source) == (t.fingerprint, 3, 16, "exact")
    assert not list(tmp_path.glob("*.tmp*"))


def test_fingerprint_mismatch_on_load_names_both(tmp_path):
    t = ByteTable.from_token_bytes([b"a"], pos_dim=4)
    path = t.save(tmp_path / "t.safetensors")
    other = ByteTable.from_token_bytes([b"b"], pos_dim=4)
    with pytest.raises(KScaleError) as e:
        ByteTable.load(path, expected_fingerprint=other.fingerprint)
    assert other.fingerprint in str(e.value) and t.fingerprint in str(e.value)


def test_damaged_or_missing_file_is_a_clear_error(tmp_path):
    path = ByteTable.from_token_bytes([b"abc", b"de"], pos_dim=4).save(tmp_path / "t.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip a byte inside the table data
    path.write_bytes(bytes(raw))
    with pytest.raises(KScaleError, match="damaged"):
        ByteTable.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KScaleError, match="corrupt byte table"):
        ByteTable.load(tmp_path / "junk.safetensors")
    with pytest.raises(KScaleError, match="not found"):
        ByteTable.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("pos_dim", [0, -3, 256, 1000, 2.5])
def test_pos_dim_out_of_range_is_rejected(pos_dim):
    with pytest.raises(KScaleError, match="pos_dim must be an integer in 1..255"):
        ByteTable.from_token_bytes([b"a"], pos_dim=pos_dim)


def test_missing_tokenizer_file_names_file_and_formats(tmp_path):
    with pytest.raises(KScaleError) as e:
        ByteTable.from_tokenizer(tmp_path / "nope.json")
    assert "nope.json" in str(e.value) and "tokenizer.json" in str(e.value) and "tiktoken" in str(e.value)


@pytest.mark.parametrize(
    "content,name",
    [
        (b"\x00\x01garbage\xff\xfe" * 10, "tok.model"),
        (b'{"model": ', "tokenizer.json"),
        (b'{"something": "else"}', "tokenizer.json"),
        (b"QUJD 0\nnot-base64!! x\n", "bad.tiktoken"),
        (b"\x1f\x8b\x08\x00garbage", "bad.tiktoken.gz"),
    ],
)
def test_corrupt_tokenizer_files_are_clear_errors(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(KScaleError) as e:
        load_tokenizer(path)
    assert name in str(e.value)


def test_unknown_byte_source_is_rejected(tmp_path):
    with pytest.raises(KScaleError, match="byte_source"):
        ByteTable.from_tokenizer(tmp_path, byte_source="raw")
