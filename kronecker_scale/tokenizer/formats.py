"""Tokenizer files in the four formats the framework reads, behind one small interface.

`load_tokenizer(path)` accepts a Hugging Face `tokenizer.json` (or a folder holding one), a
tiktoken-format rank file (`*.tiktoken`, gzip too, and Llama 3's `tokenizer.model`, which is one),
Mistral's Tekken JSON and a SentencePiece `.model`. Each reader gives, per id:

- `exact_bytes()`: the true bytes of the token (docs/design.md §3): the byte-level alphabet mapped back,
  SentencePiece `▁` as a space and `<0xNN>` as byte NN, tiktoken bytes as they are, special and added
  tokens as the UTF-8 of their text; ids the tokenizer does not define are b"".
- `decode_bytes()`: the reference package's rule, for parity with the paper: `<0xNN>` pieces are byte
  NN, special tokens their literal text, everything else `decode([id]).encode("utf-8")` (which folds
  partial UTF-8 pieces onto U+FFFD and drops SentencePiece's leading space).

and `encode(text)` / `decode(ids)` for the data pipeline and the tests.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from functools import cached_property
from pathlib import Path

from ..errors import KScaleError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # SentencePiece's word-boundary marker "▁"

FORMATS = ("hf", "tiktoken", "tekken", "sentencepiece")
EXPECTED_FORMATS = (
    "a Hugging Face tokenizer.json (or a folder with one), a tiktoken rank file (*.tiktoken, gzip ok), "
    "a Mistral Tekken JSON, or a SentencePiece .model"
)


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode alphabet used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


_UNICODE_TO_BYTE = {c: b for b, c in gpt2_byte_to_unicode().items()}


def _replace_decode(b: bytes) -> bytes:
    """What `decode([id]).encode()` gives for raw token bytes: invalid UTF-8 becomes U+FFFD."""
    return b.decode("utf-8", errors="replace").encode("utf-8")


class TokenizerFile:
    """Common interface; subclasses fill `_exact`, `_decode`, `encode`, `decode`."""

    format: str = ""

    def __init__(self, path: Path):
        self.path = Path(path)

    # --- per-id bytes ---------------------------------------------------------------------
    @cached_property
    def vocab_size(self) -> int:
        return len(self.exact_bytes())

    def exact_bytes(self) -> list[bytes]:
        return self._exact_cache

    def decode_bytes(self) -> list[bytes]:
        return self._decode_cache

    def token_bytes(self, byte_source: str) -> list[bytes]:
        if byte_source == "exact":
            return self.exact_bytes()
        if byte_source == "decode":
            return self.decode_bytes()
        raise KScaleError(f"unknown byte_source {byte_source!r}", fix="use 'exact' (default) or 'decode'")

    @cached_property
    def _exact_cache(self) -> list[bytes]:
        return self._exact()

    @cached_property
    def _decode_cache(self) -> list[bytes]:
        return self._decode()

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the id -> exact-bytes map: the tokenizer's identity, whatever file it came from."""
        h = hashlib.sha256(b"kscale-tokenizer-v1")
        for b in self.exact_bytes():
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return h.hexdigest()

    # --- to be provided -------------------------------------------------------------------
    special_ids: frozenset[int] = frozenset()
    eos_id: int | None = None

    def _exact(self) -> list[bytes]:
        raise NotImplementedError

    def _decode(self) -> list[bytes]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ------------------------------------------------------------------------------------------
def _has_component(node, type_name: str) -> bool:
    """Whether a (possibly nested Sequence) normalizer/pre-tokenizer/decoder contains `type_name`."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            return True
        return any(_has_component(v, type_name) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_has_component(v, type_name) for v in node)
    return False


class HFTokenizer(TokenizerFile):
    format = "hf"

    def __init__(self, path: Path, spec: dict):
        super().__init__(path)
        self.spec = spec
        model = spec.get("model") or {}
        self.model_type = model.get("type") or ("BPE" if "merges" in model else None)
        vocab = model.get("vocab")
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
            self.pieces = {i: p for i, (p, _score) in enumerate(vocab)}
        elif isinstance(vocab, dict):
            self.pieces = {int(i): p for p, i in vocab.items()}
        else:
            raise KScaleError("tokenizer.json has no model.vocab", where=str(path), fix=f"pass {EXPECTED_FORMATS}")
        self.added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
        self.special_ids = frozenset(i for i, t in self.added.items() if t.get("special"))
        self.byte_level = _has_component(spec.get("pre_tokenizer"), "ByteLevel") or _has_component(
            spec.get("decoder"), "ByteLevel"
        )
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.subword_prefix = model.get("continuing_subword_prefix") if self.model_type == "WordPiece" else None
        eos = [
            i
            for i, t in self.added.items()
            if t.get("content") in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
        ]
        self.eos_id = min(eos) if eos else None

    @cached_property
    def _hf(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.spec))

    def _piece_bytes(self, piece: str) -> bytes:
        if self.byte_fallback:
            m = _BYTE_PIECE.match(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        if self.byte_level:
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:  # a piece outside the byte alphabet (rare hand-added entries)
                return piece.encode("utf-8")
        if self.subword_prefix and piece.startswith(self.subword_prefix):
            piece = piece[len(self.subword_prefix) :]
        return piece.replace(_SP_SPACE, " ").encode("utf-8")

    def _size(self) -> int:
        return max([*self.pieces, *self.added]) + 1

    def _exact(self) -> list[bytes]:
        out = [b""] * self._size()
        for i, piece in self.pieces.items():
            out[i] = self._piece_bytes(piece)
        for i, tok in self.added.items():
            out[i] = tok["content"].encode("utf-8")
        return out

    def _decode(self) -> list[bytes]:
        out = [b""] * self._size()
        for i in range(len(out)):
            piece = self.added[i]["content"] if i in self.added else self.pieces.get(i)
            if piece is None:
                continue
            m = _BYTE_PIECE.match(piece)
            if m:
                out[i] = bytes([int(m.group(1), 16)])
            elif i in self.special_ids:
                out[i] = piece.encode("utf-8")
            else:
                out[i] = self._hf.decode([i], skip_special_tokens=False).encode("utf-8")
        return out

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------------------
# tiktoken rank files (and Tekken, which is tiktoken ranks behind 1000 special ids)
# ------------------------------------------------------------------------------------------
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _llama3_specials(num_ranks: int) -> dict[str, int]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    names = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    return {name: num_ranks + i for i, name in enumerate(names)}


# Known rank files (sha256 of the uncompressed file): their split pattern, special tokens and EOS.
# Official hashes as published with tiktoken; Llama 3's as shipped in llama-models 0.3.0.
KNOWN_TIKTOKEN = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930": (
        "r50k_base",
        _R50K_PATTERN,
        {"<|endoftext|>": 50256},
        "<|endoftext|>",
    ),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": (
        "cl100k_base",
        _CL100K_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "<|endoftext|>",
    ),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": (
        "o200k_base",
        _O200K_PATTERN,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "<|endoftext|>",
    ),
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55": (
        "llama3",
        _LLAMA3_PATTERN,
        _llama3_specials(128000),
        "<|end_of_text|>",
    ),
}


def parse_tiktoken_ranks(raw: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception:
            raise KScaleError(
                f"line {lineno} is not '<base64 token> <rank>'", where=str(path), fix=f"pass {EXPECTED_FORMATS}"
            ) from None
    if not ranks:
        raise KScaleError("the tiktoken rank file is empty", where=str(path), fix=f"pass {EXPECTED_FORMATS}")
    return ranks


class _RankTokenizer(TokenizerFile):
    """Token ids = `offset` special ids, then the BPE ranks; specials may also sit after the ranks."""

    def __init__(
        self,
        path: Path,
        ranks: dict[bytes, int],
        pattern: str,
        specials: dict[str, int],
        eos: str | None,
        name: str,
        size: int | None = None,
    ):
        super().__init__(path)
        self.ranks, self.pattern, self.specials, self.name = ranks, pattern, specials, name
        self.special_ids = frozenset(specials.values())
        self.eos_id = specials.get(eos) if eos else None
        self._fixed_size = size

    offset = 0

    def _size(self) -> int:
        if self._fixed_size is not None:
            return self._fixed_size
        return max([max(self.ranks.values()) + self.offset, *self.special_ids]) + 1

    def _table(self, convert) -> list[bytes]:
        out = [b""] * self._size()
        for b, r in self.ranks.items():
            if r + self.offset < len(out):
                out[r + self.offset] = convert(b)
        for name, i in self.specials.items():
            out[i] = name.encode("utf-8")
        return out

    def _exact(self) -> list[bytes]:
        return self._table(lambda b: b)

    def _decode(self) -> list[bytes]:
        return self._table(_replace_decode)

    @cached_property
    def _enc(self):
        import tiktoken

        return tiktoken.Encoding(
            name=self.name,
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens={} if self.offset else self.specials,
        )

    def encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self._enc.encode_ordinary(text)]

    def decode(self, ids: list[int]) -> str:
        by_id = self.exact_bytes()
        return b"".join(by_id[i] for i in ids).decode("utf-8", errors="replace")


class TiktokenTokenizer(_RankTokenizer):
    format = "tiktoken"


TEKKEN_V3_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]


class TekkenTokenizer(_RankTokenizer):
    """Mistral Tekken: ids 0..num_special-1 are special, then ranks (cut at default_vocab_size)."""

    format = "tekken"

    @classmethod
    def from_json(cls, path: Path, spec: dict) -> TekkenTokenizer:
        cfg = spec["config"]
        size = int(cfg["default_vocab_size"])
        n_special = int(cfg["default_num_special_tokens"])
        listed = [t["token_str"] for t in spec.get("special_tokens") or []] or TEKKEN_V3_SPECIALS
        names = listed + [f"<SPECIAL_{i}>" for i in range(len(listed), n_special)]
        ranks = {
            base64.b64decode(t["token_bytes"]): int(t["rank"])
            for t in spec["vocab"]
            if int(t["rank"]) < size - n_special
        }
        tok = cls(path, ranks, cfg["pattern"], {n: i for i, n in enumerate(names)}, "</s>", "tekken", size=size)
        tok.offset = n_special
        return tok


# ------------------------------------------------------------------------------------------
# SentencePiece .model
# ------------------------------------------------------------------------------------------
class SentencePieceTokenizer(TokenizerFile):
    format = "sentencepiece"

    def __init__(self, path: Path, sp):
        super().__init__(path)
        self.sp = sp
        n = sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        eos = sp.eos_id()
        self.eos_id = eos if eos >= 0 else None

    def _exact(self) -> list[bytes]:
        out = []
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                m = _BYTE_PIECE.match(piece)
                out.append(bytes([int(m.group(1), 16)]))  # type: ignore[union-attr]  # is_byte(i): piece is <0xNN>
            elif i in self.special_ids:
                out.append(piece.encode("utf-8"))
            else:
                out.append(piece.replace(_SP_SPACE, " ").encode("utf-8"))
        return out

    def _decode(self) -> list[bytes]:
        out = []
        for i in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(i)
            m = _BYTE_PIECE.match(piece)
            if m:
                out.append(bytes([int(m.group(1), 16)]))
            elif i in self.special_ids:
                out.append(piece.encode("utf-8"))
            else:
                out.append(self.sp.decode([i]).encode("utf-8"))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


# ------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise KScaleError(
            f"cannot read tokenizer file: {e.strerror}", where=str(path), fix=f"pass {EXPECTED_FORMATS}"
        ) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except Exception as e:
            raise KScaleError(
                f"corrupt gzip tokenizer file ({e})", where=str(path), fix="re-download or re-compress the file"
            ) from None
    return raw


def _looks_like_tiktoken(raw: bytes) -> bool:
    first = raw.split(b"\n", 1)[0].split()
    return len(first) == 2 and first[1].isdigit() and re.fullmatch(rb"[A-Za-z0-9+/=]+", first[0]) is not None


def load_tokenizer(path: str | Path) -> TokenizerFile:
    """Open a tokenizer file in any supported format (detected from the content, not the name)."""
    path = Path(path)
    if path.is_dir():
        candidates = [
            path / "tokenizer.json",
            *sorted(path.glob("tekken*.json")),
            *sorted(path.glob("*.tiktoken")),
            *sorted(path.glob("*.tiktoken.gz")),
            *sorted(path.glob("*.model")),
        ]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise KScaleError("no tokenizer file in this folder", where=str(path), fix=f"pass {EXPECTED_FORMATS}")
        path = found[0]
    if not path.exists():
        raise KScaleError("tokenizer file not found", where=str(path), fix=f"pass {EXPECTED_FORMATS}")
    raw = _read_bytes(path)
    head = raw.lstrip()[:1]
    if head in (b"{", b"["):
        try:
            spec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KScaleError(
                f"corrupt JSON tokenizer file ({e})", where=str(path), fix=f"pass {EXPECTED_FORMATS}"
            ) from None
        if isinstance(spec, dict) and "model" in spec:
            return HFTokenizer(path, spec)
        if isinstance(spec, dict) and "vocab" in spec and "default_vocab_size" in spec.get("config", {}):
            return TekkenTokenizer.from_json(path, spec)
        raise KScaleError(
            "JSON file is neither a Hugging Face tokenizer.json nor a Tekken file",
            where=str(path),
            fix=f"pass {EXPECTED_FORMATS}",
        )
    if _looks_like_tiktoken(raw):
        ranks = parse_tiktoken_ranks(raw, path)
        digest = hashlib.sha256(raw).hexdigest()
        name, pattern, specials, eos = KNOWN_TIKTOKEN.get(digest, (path.stem, _CL100K_PATTERN, {}, None))
        return TiktokenTokenizer(path, ranks, pattern, specials, eos, name)
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(raw)
    except Exception:
        raise KScaleError(
            "unrecognised or corrupt tokenizer file", where=str(path), fix=f"pass {EXPECTED_FORMATS}"
        ) from None
    return SentencePieceTokenizer(path, sp)
