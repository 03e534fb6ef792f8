"""Byte tables of real vocabularies (installed from package registries by scripts/setup.sh)."""

import pytest

from kronecker_scale.embedding import ByteTable
from kronecker_scale.tokenizer import load_tokenizer
from kronecker_scale.tokenizer.assets import ASSETS, tokenizer_path
from tiny_runs import real_text

# real English prose that ships with every CPython (real_text), plus text that needs 2-, 3- and 4-byte UTF-8
MULTILINGUAL = (
    "Grüße aus Köln — naïve café, 日本語のテキスト, Ελληνικά, русский текст, emoji 🙂🚀 and\ttabs\n\n  spaces"
)

EXPECTED = {  # name: (format, vocab size)
    "gpt2": ("hf", 50257),
    "llama3": ("tiktoken", 128256),
    "tekken": ("tekken", 131072),
    "mistral-sp": ("sentencepiece", 32000),
    "cl100k": ("tiktoken", 100277),
}


@pytest.fixture(scope="module")
def english():
    text = real_text()
    assert len(text) > 10_000
    return text


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_bytes_of_the_ids_rebuild_the_text(name, english):
    tok = load_tokenizer(tokenizer_path(name))
    fmt, size = EXPECTED[name]
    assert (tok.format, tok.vocab_size) == (fmt, size)
    exact = tok.exact_bytes()
    for text in (english, MULTILINGUAL):
        ids = tok.encode(text)
        assert len(ids) < len(text.encode())  # it really merged bytes
        rebuilt = b"".join(exact[i] for i in ids)
        # SentencePiece prepends its dummy-prefix space (this model keeps all other whitespace)
        expected = (" " + text if fmt == "sentencepiece" else text).encode("utf-8")
        assert rebuilt == expected


@pytest.mark.parametrize("name", list(EXPECTED))
def test_byte_table_of_real_vocabulary(name):
    path = tokenizer_path(name)
    table = ByteTable.from_tokenizer(path, pos_dim=32)
    assert table.vocab_size == EXPECTED[name][1]
    assert table.stats().fits > 0.995  # paper: 32 covers >= 99.82 % of tokens
    full = load_tokenizer(path).exact_bytes()
    cut_ids = [i for i, b in enumerate(full) if len(b) > 32]
    for i in cut_ids:  # truncation kept whole code points
        assert full[i].startswith(table.token(i)) and 28 <= len(table.token(i)) <= 32
        try:
            full[i].decode("utf-8")
        except UnicodeDecodeError:
            continue  # raw byte pieces have no code points to keep
        table.token(i).decode("utf-8")


def test_gpt2_decode_mode_collapses_partial_pieces_onto_u_fffd_and_exact_mode_does_not():
    path = tokenizer_path("gpt2")
    exact = ByteTable.from_tokenizer(path, pos_dim=16, byte_source="exact")
    decode = ByteTable.from_tokenizer(path, pos_dim=16, byte_source="decode")
    replacement = "\ufffd".encode()
    collapsed = sum(decode.token(i) == replacement for i in range(decode.vocab_size))
    assert collapsed >= 255  # paper: 255 GPT-2 tokens share one embedding
    assert sum(exact.token(i) == replacement for i in range(exact.vocab_size)) <= 1
    # the figures a third-party reading of the paper reports for GPT-2 at pos_dim 16
    assert decode.stats().colliding_ids == 384
    assert exact.stats().colliding_ids == 44
    assert exact.stats().fits == pytest.approx(0.9986, abs=5e-5)
    # all 256 byte values are single tokens in byte-level BPE
    singles = {exact.token(i) for i in range(exact.vocab_size) if exact.lengths[i] == 1}
    assert len(singles) == 256


def test_sentencepiece_decode_mode_loses_the_word_boundary_space():
    tok = load_tokenizer(tokenizer_path("mistral-sp"))
    i = tok.sp.piece_to_id("\u2581the")
    assert tok.exact_bytes()[i] == b" the" and tok.decode_bytes()[i] == b"the"
    byte_id = tok.sp.piece_to_id("<0x0A>")
    assert tok.exact_bytes()[byte_id] == b"\n" == tok.decode_bytes()[byte_id]
    assert tok.exact_bytes()[tok.sp.bos_id()] == b"<s>"


def test_special_tokens_are_their_literal_text():
    assert load_tokenizer(tokenizer_path("llama3")).exact_bytes()[128000] == b"<|begin_of_text|>"
    tek = load_tokenizer(tokenizer_path("tekken"))
    assert tek.exact_bytes()[1] == b"<s>" and tek.exact_bytes()[999] == b"<SPECIAL_999>" and tek.eos_id == 2
    cl = load_tokenizer(tokenizer_path("cl100k"))
    assert cl.exact_bytes()[100257] == b"<|endoftext|>" and cl.exact_bytes()[100256] == b""  # a gap id


def test_hf_folder_and_fingerprint_are_stable(tmp_path):
    path = tokenizer_path("gpt2")
    a = ByteTable.from_tokenizer(path.parent, pos_dim=32)  # a folder holding tokenizer.json
    b = ByteTable.from_tokenizer(path, pos_dim=32)
    assert a.fingerprint == b.fingerprint and a.tokenizer_fingerprint == b.tokenizer_fingerprint
    assert a.fingerprint != ByteTable.from_tokenizer(path, pos_dim=16).fingerprint
    assert a.tokenizer_fingerprint == ByteTable.from_tokenizer(path, pos_dim=16).tokenizer_fingerprint


def test_every_builtin_asset_is_listed_with_its_size():
    assert set(ASSETS) == set(EXPECTED)
    assert all(ASSETS[n].vocab_size == EXPECTED[n][1] for n in EXPECTED)
