"""The export's tokenizer: every format the project reads, as files that stock
`transformers.AutoTokenizer.from_pretrained(folder)` loads and that give the project's ids (docs/export.md).

- Hugging Face tokenizer.json: written back as it is (through `tokenizers`).
- tiktoken rank files (cl100k, o200k, r50k, Llama 3's tokenizer.model, nested cuts) and Mistral Tekken
  (tiktoken ranks behind 1,000 special ids): a byte-level BPE tokenizer.json. Vocabulary: each rank's
  bytes in GPT-2's byte alphabet, id = rank (+ the special-id offset for Tekken); special tokens at their
  own ids. Merges recovered from the ranks: for each token of rank r longer than one byte, the two
  pieces that tiktoken's own BPE, run on the token's bytes with the ranks below r, ends with (the one
  merge that can have produced it), in rank order. `ignore_merges` (a pre-token that is itself a token
  is that token) and the source's split pattern as a `Split` pre-tokenizer followed by
  `ByteLevel(use_regex=False)` make `tokenizers` reproduce tiktoken's `encode_ordinary`.
- SentencePiece .model (BPE or Unigram): transformers' SentencePiece extraction (vocabulary, scores,
  score-ordered merges) in a pipeline built from the model's own normalizer and trainer settings
  (precompiled normalization, extra-whitespace removal, dummy prefix, splitting at whitespace, byte
  fallback).

Every conversion is checked before anything is written: the converted tokenizer must give our ids and
our decoded text on PARITY_SAMPLES (several scripts, emoji, code, whitespace runs), otherwise the
export stops with a KScaleError; a format or setting that cannot be represented is refused the same way.
tokenizer.json, tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, bos/eos/unk where known,
model_max_length) and special_tokens_map.json are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KScaleError
from ..tokenizer.formats import (
    HFTokenizer,
    SentencePieceTokenizer,
    TekkenTokenizer,
    TiktokenTokenizer,
    TokenizerFile,
    gpt2_byte_to_unicode,
)

# what every converted tokenizer must tokenize exactly like ours: several scripts, emoji (ZWJ sequences,
# flags, skin tones), code, numbers, contractions, and runs of spaces, tabs and newlines
PARITY_SAMPLES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune...",
    "Don't stop: I'LL see you at 10:30pm -- we've 1,234,567.89 reasons (and 42%) they're right.",
    "Größere Übungen für Änderungen; façade, naïve café, Ærøskøbing, Łódź, İstanbul, ÇĞŞ.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Ελληνικά: Γειά σου κόσμε!",
    "مرحبا بالعالم، هذه جملة عربية. שלום עולם, זה משפט בעברית. नमस्ते दुनिया, यह हिंदी है।",
    "我能吞下玻璃而不伤身体。日本語のテキストとカタカナ、ひらがな。한국어 문장도 있습니다. สวัสดีครับ",
    "Emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🧑🏿‍💻 and symbols ∑∫√∞ ≠ ≤ → ⟨x⟩ © ™ € £ ¥ ₿",
    "def f(x: int) -> int:\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A(B):\n\tpass\n",
    'if (a && b) { printf("%d\\n", arr[i++]); } // C\n<div class="x">&nbsp;</div>\nSELECT * FROM t;',
    "   leading spaces, internal    runs,\ttabs\t\tand\r\nwindows newlines\n\n\n   trailing   ",
    "\n\n\n",
    "  ",
    "x",
    "https://example.com/path?q=1&r=%20 user@example.org 2024-01-31T12:00:00Z 0xDEADBEEF 3.14159",
    "A" * 40 + " " + "ab" * 30 + " " + "-" * 50 + " " + "=" * 33 + "\n" + "\t" * 9 + "\u00a0\u2003\u3000 end",
]

_SP_SPACE = "\u2581"
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class HFTokenizerExport:
    """A converted tokenizer (a `tokenizers.Tokenizer`) and what transformers is told about it."""

    tokenizer: Any  # tokenizers.Tokenizer
    description: str
    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    details: dict = field(default_factory=dict)

    def token_id(self, name: str | None) -> int | None:
        return None if name is None else self.tokenizer.token_to_id(name)


# ------------------------------------------------------------------------------------------
# tiktoken ranks -> byte-level BPE
# ------------------------------------------------------------------------------------------
def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken's byte-pair merge of `token`'s bytes, using only ranks below max_rank: repeatedly merge
    the adjacent pair whose concatenation has the lowest rank (leftmost on ties)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """(merges in rank order, tokens no merge produces). The merge of a token of rank r is the pair that
    tiktoken's BPE on its bytes with the ranks below r ends with: the only pair that can produce it,
    since a token's bytes evolve the same way inside any text until the token forms."""
    merges, unreachable = [], []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(ranks, token, r)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:  # only reachable as a whole pre-token (ignore_merges)
            unreachable.append(token)
    return merges, unreachable


def onig_pattern(pattern: str) -> str:
    """tiktoken's (fancy-regex) split pattern for `tokenizers` (Oniguruma, Ruby syntax), where `X{n,m}+` is
    not possessive but `(X{n,m})+`: the possessive interval becomes a plain one. (In the patterns of
    cl100k / o200k / Llama 3 / Tekken nothing follows it inside its branch, so no match changes; the
    export's self-check covers any other.)"""
    return re.sub(r"(?<!\\)(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def byte_level_bpe(
    ranks: dict[bytes, int], pattern: str, specials: dict[str, int], *, offset: int = 0, where: str = ""
):
    """A `tokenizers.Tokenizer` that encodes like tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks)
    .encode_ordinary, ids shifted by `offset`; `specials` {text: id} as special added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    singles = {t for t in ranks if len(t) == 1}
    if len(singles) != 256:
        raise KScaleError(
            f"the vocabulary has {len(singles)} of the 256 single bytes: a byte-level BPE cannot represent it",
            where=where,
            fix="export a vocabulary that gives every byte a rank",
        )
    if len(set(ranks.values())) != len(ranks):
        raise KScaleError(
            "two tokens share a rank: the merge order is ambiguous",
            where=where,
            fix="pass a tiktoken file with one rank per token",
        )
    b2u = gpt2_byte_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {as_str(t): r + offset for t, r in ranks.items()}
    taken = {i: s for s, i in vocab.items()}
    for name, i in specials.items():
        if name in vocab and vocab[name] != i:
            raise KScaleError(
                f"special token {name!r} (id {i}) has the same text as the ordinary token id "
                f"{vocab[name]}: one tokenizer.json vocabulary cannot hold both",
                where=where,
                fix="rename the special token or drop it from the vocabulary",
            )
        if i in taken:
            raise KScaleError(
                f"special token {name!r} has id {i}, which the rank of {taken[i]!r} also gives",
                where=where,
                fix="give special tokens ids outside the ranks",
            )
        vocab[name] = i
    merges, unreachable = merges_from_ranks(ranks)
    try:
        split = pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated", invert=False)
    except Exception as e:
        raise KScaleError(
            f"the split pattern is not a regex `tokenizers` can run ({e})",
            where=where,
            fix="use a tokenizer whose pattern Oniguruma accepts",
        ) from None
    tok = Tokenizer(
        BPE(vocab=vocab, merges=[(as_str(a), as_str(b)) for a, b in merges], fuse_unk=False, ignore_merges=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(name, special=True, normalized=False)
            for name, _i in sorted(specials.items(), key=lambda kv: kv[1])
        ]
    )
    return tok, {
        "ranks": len(ranks),
        "merges": len(merges),
        "tokens_without_merge": len(unreachable),
        "pattern": pattern,
        "special_tokens": len(specials),
    }


def _from_ranks(tok: TiktokenTokenizer | TekkenTokenizer) -> HFTokenizerExport:
    offset = tok.offset
    ranks = {b: r for b, r in tok.ranks.items() if r + offset < tok.vocab_size}  # Tekken: cut at its size
    hf, details = byte_level_bpe(ranks, tok.pattern, tok.specials, offset=offset, where=str(tok.path))
    names = set(tok.specials)
    eos = next((n for n, i in tok.specials.items() if i == tok.eos_id), None)
    bos = next((n for n in _BOS_NAMES if n in names), eos)
    unk = "<unk>" if "<unk>" in names else None
    kind = "Tekken" if isinstance(tok, TekkenTokenizer) else f"tiktoken ({tok.name})"
    return HFTokenizerExport(
        hf, f"byte-level BPE from the {kind} ranks, {details['merges']:,} merges recovered", bos, eos, unk, details
    )


# ------------------------------------------------------------------------------------------
# SentencePiece
# ------------------------------------------------------------------------------------------
def _sentencepiece(tok: SentencePieceTokenizer) -> HFTokenizerExport:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    try:
        from transformers.convert_slow_tokenizer import generate_merges, import_protobuf
    except ImportError as e:
        raise KScaleError(
            f"SentencePiece export needs transformers' converter ({e})",
            fix="install the project's `hf` extra (pip install -e '.[hf]')",
        ) from None
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    ts, ns, where = proto.trainer_spec, proto.normalizer_spec, str(tok.path)
    refuse = []
    if ts.model_type not in (1, 2):
        refuse.append(f"model type {ts.model_type} (only Unigram = 1 and BPE = 2 have a fast counterpart)")
    if not ns.escape_whitespaces:
        refuse.append("escape_whitespaces = false")
    if ts.treat_whitespace_as_suffix:
        refuse.append("treat_whitespace_as_suffix = true")
    if ns.name not in ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "") and not ns.precompiled_charsmap:
        refuse.append(f"normalizer {ns.name!r} without a precompiled charsmap")
    if refuse:
        raise KScaleError(
            "this SentencePiece model cannot be converted to a transformers fast tokenizer: " + "; ".join(refuse),
            where=where,
            fix="export with a SentencePiece BPE/Unigram model, or convert the tokenizer yourself",
        )
    pieces = list(proto.pieces)
    vocab_scores = [(p.piece, p.score) for p in pieces]
    if ts.model_type == 2:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        # merges ordered by the merged piece's score (SentencePiece BPE merges the best-scoring pair first);
        # control, unknown, byte and unused pieces are never merge results or parts
        skip = [p.piece for p in pieces if p.type in (_SP_UNKNOWN, _SP_CONTROL, _SP_BYTE, _SP_UNUSED, _SP_USER_DEFINED)]
        normal_scores = [(p.piece, p.score) for p in pieces if p.type == _SP_NORMAL]
        merges = generate_merges(vocab, normal_scores, skip_tokens=skip)
        model: Any = BPE(
            vocab=vocab,
            merges=merges,
            unk_token=ts.unk_piece or None,
            fuse_unk=True,
            byte_fallback=ts.byte_fallback,
            dropout=None,
        )
    else:
        model = Unigram(vocab_scores, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    hf = Tokenizer(model)
    # SentencePiece: normalize (charsmap), remove extra whitespace, add the dummy prefix, spaces -> "▁"
    norm: list[Any] = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend(_SP_SPACE))
    norm.append(normalizers.Replace(" ", _SP_SPACE))
    hf.normalizer = normalizers.Sequence(norm)
    if ts.split_by_whitespace:
        # SentencePiece's SplitIntoWords: a piece starts at each "▁" (at a run of them when whitespace-only
        # pieces are allowed, the run then belongs to the next word)
        pattern = "▁*[^▁]+|▁+" if ts.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    dec: list[Any] = [decoders.Replace(_SP_SPACE, " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(dec)
    special = [
        AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN)
    ]
    hf.add_special_tokens(special)
    user = [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _SP_USER_DEFINED]
    if user:
        hf.add_tokens(user)

    def piece(i: int) -> str | None:
        return tok.sp.id_to_piece(i) if 0 <= i < tok.sp.get_piece_size() else None

    return HFTokenizerExport(
        hf,
        f"transformers fast tokenizer from the SentencePiece {'BPE' if ts.model_type == 2 else 'Unigram'} model",
        piece(tok.sp.bos_id()),
        piece(tok.sp.eos_id()),
        piece(tok.sp.unk_id()),
        {
            "pieces": len(pieces),
            "byte_fallback": ts.byte_fallback,
            "add_dummy_prefix": ns.add_dummy_prefix,
            "remove_extra_whitespaces": ns.remove_extra_whitespaces,
        },
    )


# ------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ------------------------------------------------------------------------------------------
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


def _hf_json(tok: HFTokenizer) -> HFTokenizerExport:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(json.dumps(tok.spec))
    added = {t["content"] for t in tok.added.values()}
    eos = next((n for n in _EOS_NAMES if n in added), None)
    bos = next((n for n in _BOS_NAMES if n in added), eos)
    unk = (tok.spec.get("model") or {}).get("unk_token") or eos
    return HFTokenizerExport(
        hf, "transformers tokenizer (the source tokenizer.json)", bos, eos, unk, {"model": tok.model_type}
    )


def build_hf_tokenizer(tok: TokenizerFile) -> HFTokenizerExport:
    """The converted tokenizer for any format load_tokenizer reads; KScaleError for what cannot be converted."""
    if isinstance(tok, HFTokenizer):
        return _hf_json(tok)
    if isinstance(tok, TiktokenTokenizer | TekkenTokenizer):
        return _from_ranks(tok)
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece(tok)
    raise KScaleError(
        f"no Hugging Face conversion for the {type(tok).__name__} tokenizer format",
        where=str(tok.path),
        fix="export a model trained with an HF, tiktoken, Tekken or SentencePiece tokenizer",
    )


# ------------------------------------------------------------------------------------------
# parity and files
# ------------------------------------------------------------------------------------------
def compare_ids(tok: TokenizerFile, encode, decode, texts) -> dict:
    """Our ids vs the other tokenizer's on each text, and the other's decode(encode(text)) round trip."""
    mismatches, not_round_trip, tokens = [], [], 0
    for k, text in enumerate(texts):
        ours, theirs = tok.encode(text), list(encode(text))
        tokens += len(ours)
        if ours != theirs:
            at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            mismatches.append(
                {"sample": k, "text": text[:80], "position": at, "ours": ours[at : at + 8], "hf": theirs[at : at + 8]}
            )
        back = decode(theirs)
        if back != text and back != tok.decode(ours):
            not_round_trip.append({"sample": k, "text": text[:80], "decoded": back[:80]})
        elif back != text:  # the source itself does not round-trip it (e.g. SentencePiece whitespace)
            not_round_trip.append({"sample": k, "text": text[:80], "decoded": back[:80], "same_as_ours": True})
    return {
        "samples": len(texts),
        "tokens": tokens,
        "ids_match": not mismatches,
        "round_trip": not not_round_trip,
        "decode_matches_ours": all(r.get("same_as_ours") for r in not_round_trip),
        "mismatches": mismatches[:5],
        "not_round_trip": not_round_trip[:5],
    }


def tokenizer_parity(tok: TokenizerFile, out_dir: str | Path, texts=None) -> dict:
    """Reload the exported tokenizer with stock AutoTokenizer and compare with ours on `texts`
    (PARITY_SAMPLES by default). ok: same ids everywhere and decode as good as ours."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    texts = list(PARITY_SAMPLES if texts is None else texts)
    report = compare_ids(
        tok,
        lambda t: hf(t, add_special_tokens=False)["input_ids"],
        lambda ids: hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        texts,
    )
    report["class"] = type(hf).__name__
    report["ok"] = report["ids_match"] and report["decode_matches_ours"]
    return report


def write_hf_tokenizer(conv: HFTokenizerExport, out: Path, model_max_length: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into out."""
    out.mkdir(parents=True, exist_ok=True)
    conv.tokenizer.save(str(out / "tokenizer.json"))
    roles = {k: v for k, v in (("bos_token", conv.bos), ("eos_token", conv.eos), ("unk_token", conv.unk)) if v}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **roles,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(roles, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def export_tokenizer(tok: TokenizerFile, out: str | Path, model_max_length: int) -> dict:
    """Convert, check on PARITY_SAMPLES (KScaleError on any difference), write. Returns what was done."""
    conv = build_hf_tokenizer(tok)
    check = compare_ids(
        tok,
        lambda t: conv.tokenizer.encode(t, add_special_tokens=False).ids,
        lambda ids: conv.tokenizer.decode(ids, skip_special_tokens=False),
        PARITY_SAMPLES,
    )
    if not check["ids_match"] or not check["decode_matches_ours"]:
        bad = (check["mismatches"] or check["not_round_trip"])[0]
        raise KScaleError(
            f"the converted tokenizer does not reproduce ours on sample {bad['sample']} "
            f"({bad['text']!r}): {json.dumps({k: v for k, v in bad.items() if k != 'text'})}",
            where=str(tok.path),
            fix="this tokenizer's settings have no exact transformers counterpart; nothing was "
            "exported (report it with the sample)",
        )
    files = write_hf_tokenizer(conv, Path(out), model_max_length)
    return {
        "description": conv.description,
        "format": tok.format,
        "source": str(tok.path),
        "files": files,
        "bos_token": conv.bos,
        "eos_token": conv.eos,
        "unk_token": conv.unk,
        "bos_token_id": conv.token_id(conv.bos),
        "eos_token_id": conv.token_id(conv.eos),
        "self_check": {k: check[k] for k in ("samples", "tokens", "ids_match", "round_trip")},
        **conv.details,
    }


def special_token_ids(tok: TokenizerFile) -> dict:
    """bos/eos ids of the model config, from the tokenizer's own roles (None where it has none)."""
    if isinstance(tok, HFTokenizer | TiktokenTokenizer | TekkenTokenizer):
        if isinstance(tok, HFTokenizer):
            by_name = {t["content"]: i for i, t in tok.added.items()}
        else:
            by_name = dict(tok.specials)
        eos = tok.eos_id
        bos = next((by_name[n] for n in _BOS_NAMES if n in by_name), eos)
        return {"bos_token_id": bos, "eos_token_id": eos}
    if isinstance(tok, SentencePieceTokenizer):
        b, e = tok.sp.bos_id(), tok.sp.eos_id()
        return {"bos_token_id": b if b >= 0 else None, "eos_token_id": e if e >= 0 else None}
    return {"bos_token_id": None, "eos_token_id": None}
