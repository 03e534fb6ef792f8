"""Tokenizers of any size for vocabulary-scaling runs: train a byte-level BPE, or cut a real one.

`train_bpe` trains a GPT-2-style byte-level BPE with Hugging Face `tokenizers` (offline, ~11 s for
32K on 50 MB on 2 cores) and saves a `tokenizer.json`.

`cut_tiktoken` makes nested vocabularies from a real one: in a tiktoken rank file, keeping the ranks
below N is the same as stopping BPE after N - 256 merges, so cl100k cut to 4,096 / 8,192 / … gives a
family of vocabularies in which every smaller one is a prefix of the larger ones.
"""

from __future__ import annotations

import base64
import os
import sys
import time
import warnings
from pathlib import Path

from ..errors import KScaleError

MIN_BYTE_VOCAB = 256  # every byte must have an id, or some text cannot be encoded
MAX_VOCAB = 262_144  # the largest vocabulary the framework targets (Gemma's)
_CHUNK_CHARS = 1 << 20  # training text goes to the trainer in ~1 MB pieces cut at line ends


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


# ------------------------------------------------------------------------------------------
# training a byte-level BPE
# ------------------------------------------------------------------------------------------
def check_vocab_size(vocab_size: int, n_special: int) -> int:
    low = MIN_BYTE_VOCAB + n_special
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not low <= vocab_size <= MAX_VOCAB:
        raise KScaleError(
            f"vocab_size must be an integer in {low:,}..{MAX_VOCAB:,}, got {vocab_size!r}",
            where="vocab_size",
            fix=f"a byte-level BPE needs {MIN_BYTE_VOCAB} byte ids + {n_special} special token(s); "
            f"pick a size in {low:,}..{MAX_VOCAB:,}",
        )
    return vocab_size


def _check_files(files) -> list[Path]:
    paths = [Path(f) for f in files]
    if not paths:
        raise KScaleError("no training files given", fix="pass one or more UTF-8 text files")
    for p in paths:
        if not p.is_file():
            raise KScaleError("training file not found", where=str(p), fix="pass existing text files")
    return paths


def _text_chunks(paths: list[Path]):
    """The files' text in ~1 MB pieces; invalid UTF-8 becomes U+FFFD (the trainer rejects raw bytes)."""
    for p in paths:
        with open(p, encoding="utf-8", errors="replace", newline="") as f:
            buf, size = [], 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)


def _new_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    files: list[Path],
    vocab_size: int,
    out_path: Path,
    *,
    min_frequency: int = 2,
    special_tokens=("<|endoftext|>",),
    progress=None,
) -> Path:
    """Train a byte-level BPE on `files` and save it as a Hugging Face tokenizer.json at out_path.

    Special tokens take the first ids (so `<|endoftext|>` is id 0), then the 256 bytes, then merges.
    On little text the trainer can run out of pairs seen `min_frequency` times and stop below
    `vocab_size`; that is reported through `progress` (or a warning), not raised. The size reached is
    `load_tokenizer(out_path).vocab_size`.
    """
    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel

    special_tokens = list(special_tokens)
    check_vocab_size(vocab_size, len(special_tokens))
    if min_frequency < 1:
        raise KScaleError(f"min_frequency must be >= 1, got {min_frequency}", where="min_frequency")
    paths = _check_files(files)
    out_path = Path(out_path)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    _say(progress, f"training byte-level BPE, vocab {vocab_size:,}, on {len(paths)} file(s), {mb:.1f} MB")

    tok = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=progress is None and sys.stderr.isatty(),
    )
    start = time.perf_counter()
    tok.train_from_iterator(_text_chunks(paths), trainer=trainer)
    seconds = time.perf_counter() - start
    reached = tok.get_vocab_size()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out_path)  # a crash never leaves a half-written tokenizer.json

    _say(progress, f"vocab {reached:,} reached in {seconds:.1f} s -> {out_path}")
    if reached < vocab_size:
        msg = (
            f"the trained vocabulary has {reached:,} ids, fewer than the {vocab_size:,} requested: the text "
            f"ran out of byte pairs seen >= {min_frequency} times; train on more text or lower min_frequency"
        )
        if progress:
            progress(msg)
        else:
            warnings.warn(msg, stacklevel=2)
    return out_path


# ------------------------------------------------------------------------------------------
# nested vocabularies by rank truncation
# ------------------------------------------------------------------------------------------
def _load_ranks(src) -> dict[bytes, int]:
    from ..tokenizer import load_tokenizer
    from ..tokenizer.formats import TiktokenTokenizer

    tok = load_tokenizer(src)
    if not isinstance(tok, TiktokenTokenizer):
        raise KScaleError(
            f"cannot cut a {tok.format!r} tokenizer by rank",
            where=str(src),
            fix="pass a tiktoken rank file (*.tiktoken, gzip ok, or Llama 3's tokenizer.model)",
        )
    return tok.ranks


def cut_tiktoken(src, n_ranks: int, out_path: Path) -> Path:
    """Keep the ranks < n_ranks of a tiktoken rank file (plain or gzip); write a plain `.tiktoken` file.

    The result is a vocabulary of exactly n_ranks ids, each with the same bytes as in the source. Its
    file hash is not one of the known vocabularies (tokenizer.formats.KNOWN_TIKTOKEN), so
    `load_tokenizer` gives it no special tokens (no end-of-document id: pass one, e.g. `--eod-id`, or
    append it after the ranks yourself) and the cl100k split pattern. That pattern is right for cuts of
    cl100k; for cuts of o200k / Llama 3 it differs slightly from the original, which changes how text
    is split into words but not which tokens exist.
    """
    ranks = _load_ranks(src)
    available = len(ranks)
    if not isinstance(n_ranks, int) or isinstance(n_ranks, bool) or not MIN_BYTE_VOCAB <= n_ranks <= available:
        raise KScaleError(
            f"n_ranks must be an integer in {MIN_BYTE_VOCAB}..{available:,}, got {n_ranks!r}",
            where=str(src),
            fix=f"this file has {available:,} ranks; below {MIN_BYTE_VOCAB} some bytes would have no id",
        )
    kept = sorted((rank, token) for token, rank in ranks.items() if rank < n_ranks)
    if len(kept) != n_ranks:
        raise KScaleError(
            f"the ranks below {n_ranks:,} have gaps ({len(kept):,} present)",
            where=str(src),
            fix="pick another n_ranks; a cut must give ids 0..n_ranks-1",
        )
    single_bytes = {token for _rank, token in kept if len(token) == 1}
    if len(single_bytes) != 256:
        raise KScaleError(
            f"the first {n_ranks:,} ranks hold only {len(single_bytes)} of the 256 single bytes",
            where=str(src),
            fix="pick a larger n_ranks so that every byte has an id",
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in kept))
    os.replace(tmp, out_path)
    return out_path
