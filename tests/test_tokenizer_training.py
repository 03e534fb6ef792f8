"""Tokenizers for vocabulary scaling: a byte-level BPE trained on the demo corpus, and cl100k cut by rank."""

import gzip

import pytest

from kronecker_scale.data.corpus import build_demo_corpus
from kronecker_scale.data.tokenizer_training import cut_tiktoken, train_bpe
from kronecker_scale.embedding import ByteTable
from kronecker_scale.errors import KScaleError
from kronecker_scale.tokenizer import load_tokenizer
from kronecker_scale.tokenizer.assets import tokenizer_path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "demo"
    build_demo_corpus(out, max_train_mb=3)  # the three Austen novels, 2.0 MB
    return out


@pytest.fixture(scope="module")
def heldout(demo):
    """About 1 MB of real held-out English of other genres: Brown fiction + the latest SOTU speeches."""
    parts = [(demo / "heldout" / "brown-ck.txt").read_text(encoding="utf-8")]
    for p in sorted((demo / "heldout").glob("sotu-*.txt"), reverse=True):
        parts.append(p.read_text(encoding="utf-8"))
        if sum(map(len, parts)) > 1_000_000:
            break
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    files = sorted((demo / "train").glob("*.txt"))
    assert sum(f.stat().st_size for f in files) > 1.5e6
    messages = []
    path = train_bpe(files, 1000, tmp_path_factory.mktemp("bpe") / "tokenizer.json", progress=messages.append)
    return path, messages


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def test_trained_bpe_has_the_requested_size(trained):
    path, messages = trained
    tok = load_tokenizer(path)
    assert tok.format == "hf" and tok.byte_level and tok.model_type == "BPE"
    assert tok.vocab_size == 1000
    assert ByteTable.from_tokenizer(path, pos_dim=32).vocab_size == 1000
    assert any("vocab 1,000 reached" in m for m in messages)
    assert not any("fewer than" in m for m in messages)
    assert not list(path.parent.glob(".*tmp*"))  # written atomically


def test_trained_bpe_round_trips_heldout_text_exactly(trained, heldout):
    path, _ = trained
    tok = load_tokenizer(path)
    ids = tok.encode(heldout)
    assert tok.decode(ids) == heldout
    exact = tok.exact_bytes()
    assert b"".join(exact[i] for i in ids) == heldout.encode("utf-8")
    table = ByteTable.from_tokenizer(path, pos_dim=32)
    assert table.stats().truncated == 0  # 1000 ids: no token longer than 32 bytes
    assert b"".join(table.token(i) for i in set(ids)) == b"".join(exact[i] for i in set(ids))
    bytes_per_token = len(heldout.encode()) / len(ids)
    assert 2.0 < bytes_per_token < 3.2  # merges learnt on Austen carry over
    # byte-level BPE: every single byte has an id, so text of any script still encodes losslessly
    other = "Grüße — 日本語 🙂\t\n"
    assert tok.decode(tok.encode(other)) == other


def test_end_of_text_is_a_special_token(trained):
    tok = load_tokenizer(trained[0])
    assert tok.eos_id == 0 and 0 in tok.special_ids
    assert tok.exact_bytes()[0] == b"<|endoftext|>"
    assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [0] + tok.encode("b")


@pytest.mark.parametrize("size", [100, 256, 300_000, 2.5])
def test_bad_vocab_sizes_are_refused(size, demo, tmp_path):
    with pytest.raises(KScaleError) as e:
        train_bpe([demo / "train" / "austen-emma.txt"], size, tmp_path / "t.json")
    assert repr(size) in str(e.value) and "257..262,144" in str(e.value)
    assert not (tmp_path / "t.json").exists()


def test_small_text_reports_the_size_reached(tmp_path):
    # invalid UTF-8 too: the trainer gets U+FFFD instead of failing on the raw bytes
    src = tmp_path / "small.txt"
    src.write_bytes(b"It is a truth universally acknowledged, caf\xe9.\n" * 50)
    messages = []
    out = train_bpe([src], 5000, tmp_path / "small.json", progress=messages.append)
    reached = load_tokenizer(out).vocab_size
    assert 257 < reached < 5000
    assert any(f"has {reached:,} ids, fewer than the 5,000 requested" in m for m in messages)
    with pytest.warns(UserWarning, match="fewer than the 5,000 requested"):
        train_bpe([src], 5000, tmp_path / "small2.json")


def test_missing_training_file_is_named(tmp_path):
    with pytest.raises(KScaleError, match="training file not found") as e:
        train_bpe([tmp_path / "nope.txt"], 1000, tmp_path / "t.json")
    assert "nope.txt" in str(e.value)


# ------------------------------------------------------------------------------------------
# nested vocabularies: cl100k cut by rank
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cl100k():
    return load_tokenizer(tokenizer_path("cl100k"))


@pytest.fixture(scope="module")
def cuts(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuts")
    src = tokenizer_path("cl100k")
    assert src.read_bytes()[:2] == b"\x1f\x8b"  # the installed file is gzip
    return {n: cut_tiktoken(src, n, out / f"cl100k_{n}.tiktoken") for n in (4096, 8192)}


def test_cut_keeps_the_first_ranks_byte_for_byte(cuts, cl100k):
    full = cl100k.exact_bytes()
    for n, path in cuts.items():
        raw = path.read_bytes()
        assert raw[:2] != b"\x1f\x8b"  # plain text
        lines = raw.decode("ascii").splitlines()
        assert [int(line.split()[1]) for line in lines] == list(range(n))  # sorted by rank, no gaps
        tok = load_tokenizer(path)
        assert tok.format == "tiktoken" and tok.vocab_size == n and not tok.special_ids
        assert tok.exact_bytes() == full[:n]
    assert load_tokenizer(cuts[8192]).exact_bytes()[:4096] == load_tokenizer(cuts[4096]).exact_bytes()


def test_more_merges_give_fewer_tokens(cuts, cl100k, heldout):
    counts = {}
    for n, path in cuts.items():
        tok = load_tokenizer(path)
        ids = tok.encode(heldout)
        assert max(ids) < n and tok.decode(ids) == heldout
        counts[n] = len(ids)
    counts["full"] = len(cl100k.encode(heldout))
    assert counts[4096] > counts[8192] > counts["full"]
    # measured before: 3.44 / 3.96 / 5.23 bytes per token on SOTU
    n_bytes = len(heldout.encode())
    assert 3.0 < n_bytes / counts[4096] < 4.2
    assert 3.5 < n_bytes / counts[8192] < 4.6
    assert 4.5 < n_bytes / counts["full"] < 5.8


def test_cut_reads_plain_files_too(cuts, tmp_path):
    again = cut_tiktoken(cuts[8192], 4096, tmp_path / "again.tiktoken")
    assert again.read_bytes() == cuts[4096].read_bytes()
    gz = tmp_path / "cut.tiktoken.gz"
    gz.write_bytes(gzip.compress(cuts[4096].read_bytes()))
    assert cut_tiktoken(gz, 4096, tmp_path / "from_gz.tiktoken").read_bytes() == cuts[4096].read_bytes()


@pytest.mark.parametrize("n", [10, 255, 100_257])
def test_bad_cut_sizes_are_refused(n, tmp_path):
    with pytest.raises(KScaleError) as e:
        cut_tiktoken(tokenizer_path("cl100k"), n, tmp_path / "c.tiktoken")
    assert f"got {n}" in str(e.value) and "256..100,256" in str(e.value)
    assert not (tmp_path / "c.tiktoken").exists()


def test_only_rank_files_can_be_cut(trained, tmp_path):
    with pytest.raises(KScaleError, match="cannot cut a 'hf' tokenizer"):
        cut_tiktoken(trained[0], 512, tmp_path / "c.tiktoken")
