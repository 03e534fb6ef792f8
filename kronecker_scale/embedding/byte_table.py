"""The byte table: every token id's UTF-8 bytes, cut to pos_dim, as uint8 [V, P] + int16 [V] lengths.

Built once from the tokenizer (docs/design.md §3), saved beside every checkpoint with a fingerprint, and
checked on load. About 4.5 MB at V = 131,072, P = 32.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import KScaleError

BYTE_SOURCES = ("exact", "decode")
FILE_FORMAT = "kscale-byte-table-v1"


def check_pos_dim(pos_dim: int) -> int:
    # lengths are stored per id and positions index a 256 * P code; 255 keeps both in small ints
    if not isinstance(pos_dim, int) or isinstance(pos_dim, bool) or not 1 <= pos_dim <= 255:
        raise KScaleError(
            f"pos_dim must be an integer in 1..255, got {pos_dim!r}",
            where="embedding.pos_dim",
            fix="use 16 (the paper's 124M runs) or 32 (default)",
        )
    return pos_dim


def utf8_safe_truncate(b: bytes, limit: int) -> bytes:
    """Cut `b` to at most `limit` bytes without splitting a UTF-8 code point.

    Walks back over at most 3 continuation bytes (10xxxxxx) at the cut; raw byte tokens that are not
    valid UTF-8 (GPT-2 partial pieces) have no code point to protect and are cut at `limit`.
    """
    if len(b) <= limit:
        return b
    cut = limit
    while cut > limit - 3 and cut > 0 and (b[cut] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and (b[cut] & 0xC0) == 0x80:  # still mid-sequence: not UTF-8 at all, plain cut
        cut = limit
    return b[:cut]


def _fingerprint(table: np.ndarray, lengths: np.ndarray, pos_dim: int, byte_source: str) -> str:
    h = hashlib.sha256(f"{FILE_FORMAT}|pos_dim={pos_dim}|byte_source={byte_source}|".encode())
    h.update(np.ascontiguousarray(table, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(lengths, dtype="<i2").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ByteTableStats:
    vocab_size: int
    pos_dim: int
    coverage: float  # share of ids with L < pos_dim (the reference's rule: L == P counts as cut)
    fits: float  # share of ids whose bytes were not cut (len <= pos_dim): the paper's figure
    truncated: int  # ids whose bytes were actually cut (len > pos_dim)
    empty: int  # ids with L == 0 (undefined ids, empty specials)
    colliding_ids: int  # ids whose (bytes, L) row equals another id's
    collision_groups: int
    length_histogram: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ByteTable:
    """uint8 bytes [V, pos_dim] + int16 lengths [V] + fingerprint.

    `vocab_size` counts rows (padding included); `num_token_ids` is the tokenizer's own size, the rows
    the fingerprint covers. Padded rows have L = 0 and embed to zero.
    """

    def __init__(
        self,
        table: torch.Tensor,
        lengths: torch.Tensor,
        pos_dim: int,
        *,
        byte_source: str,
        num_token_ids: int | None = None,
        tokenizer_fingerprint: str | None = None,
        source: str | None = None,
        full_lengths: np.ndarray | None = None,
    ):
        self.pos_dim = check_pos_dim(pos_dim)
        if table.dtype != torch.uint8 or table.dim() != 2 or table.shape[1] != pos_dim:
            raise KScaleError(f"byte table must be uint8 [V, {pos_dim}], got {tuple(table.shape)} {table.dtype}")
        if lengths.shape != (table.shape[0],):
            raise KScaleError(f"lengths must be [{table.shape[0]}], got {tuple(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > pos_dim):
            raise KScaleError(f"lengths must lie in 0..{pos_dim}")
        self.bytes = table
        self.lengths = lengths.to(torch.int16)
        self.byte_source = byte_source
        self.num_token_ids = table.shape[0] if num_token_ids is None else num_token_ids
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.source = source
        # untruncated byte lengths of the real ids (known when built from token bytes): for the stats
        self.full_lengths = full_lengths
        self.fingerprint = _fingerprint(
            table[: self.num_token_ids].numpy(), self.lengths[: self.num_token_ids].numpy(), pos_dim, byte_source
        )

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_token_bytes(
        cls,
        token_bytes: list[bytes],
        pos_dim: int = 32,
        *,
        byte_source: str = "exact",
        tokenizer_fingerprint: str | None = None,
        source: str | None = None,
    ) -> ByteTable:
        check_pos_dim(pos_dim)
        V = len(token_bytes)
        table: np.ndarray = np.zeros((V, pos_dim), dtype=np.uint8)
        lengths: np.ndarray = np.zeros(V, dtype=np.int16)
        for i, b in enumerate(token_bytes):
            b = utf8_safe_truncate(b, pos_dim)
            table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
            lengths[i] = len(b)
        return cls(
            torch.from_numpy(table),
            torch.from_numpy(lengths),
            pos_dim,
            byte_source=byte_source,
            tokenizer_fingerprint=tokenizer_fingerprint,
            source=source,
            full_lengths=np.fromiter((len(b) for b in token_bytes), dtype=np.int64, count=V),
        )

    @classmethod
    def from_tokenizer(cls, path, pos_dim: int = 32, byte_source: str = "exact") -> ByteTable:
        """Build from a tokenizer file in any format `load_tokenizer` reads."""
        from ..tokenizer import load_tokenizer

        check_pos_dim(pos_dim)
        if byte_source not in BYTE_SOURCES:
            raise KScaleError(
                f"unknown byte_source {byte_source!r}",
                where="embedding.byte_source",
                fix="use 'exact' (default) or 'decode' (reference-package parity)",
            )
        tok = load_tokenizer(path)
        return cls.from_token_bytes(
            tok.token_bytes(byte_source),
            pos_dim,
            byte_source=byte_source,
            tokenizer_fingerprint=tok.fingerprint,
            source=str(tok.path),
        )

    @classmethod
    def from_arrays(cls, table, lengths, pos_dim: int, *, byte_source: str = "arrays") -> ByteTable:
        """Build from tensors or numpy arrays (uint8 [V, P], integer [V])."""
        table = torch.as_tensor(np.asarray(table) if not torch.is_tensor(table) else table)
        lengths = torch.as_tensor(np.asarray(lengths) if not torch.is_tensor(lengths) else lengths)
        if table.dtype != torch.uint8:
            if table.numel() and (int(table.min()) < 0 or int(table.max()) > 255):
                raise KScaleError("byte values must lie in 0..255")
            table = table.to(torch.uint8)
        return cls(table.contiguous(), lengths.to(torch.int16), pos_dim, byte_source=byte_source)

    def pad_to(self, multiple: int) -> ByteTable:
        """A table whose row count is a multiple of `multiple`; the added rows have L = 0."""
        if multiple < 1:
            raise KScaleError(f"pad multiple must be >= 1, got {multiple}")
        V = self.vocab_size
        padded = -(-V // multiple) * multiple
        if padded == V:
            return self
        extra = padded - V
        return ByteTable(
            torch.cat([self.bytes, self.bytes.new_zeros(extra, self.pos_dim)]),
            torch.cat([self.lengths, self.lengths.new_zeros(extra)]),
            self.pos_dim,
            byte_source=self.byte_source,
            num_token_ids=self.num_token_ids,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            source=self.source,
            full_lengths=self.full_lengths,
        )

    # --- properties -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.bytes.shape[0]

    def token(self, i: int) -> bytes:
        return bytes(self.bytes[i, : int(self.lengths[i])].tolist())

    def stats(self) -> ByteTableStats:
        n = self.num_token_ids
        table = self.bytes[:n].numpy()
        lengths = self.lengths[:n].numpy().astype(np.int64)
        full = self.full_lengths if self.full_lengths is not None else lengths
        rows = np.concatenate([table, lengths[:, None].astype(np.uint8)], axis=1)
        nonempty = lengths > 0
        _, inverse, counts = np.unique(rows[nonempty], axis=0, return_inverse=True, return_counts=True)
        colliding = int((counts[inverse.reshape(-1)] > 1).sum())
        return ByteTableStats(
            vocab_size=n,
            pos_dim=self.pos_dim,
            coverage=float((lengths < self.pos_dim).mean()) if n else 1.0,
            fits=float((full <= self.pos_dim).mean()) if n else 1.0,
            truncated=int((full > self.pos_dim).sum()),
            empty=int((~nonempty).sum()),
            colliding_ids=colliding,
            collision_groups=int((counts > 1).sum()),
            length_histogram=dict(sorted(Counter(lengths.tolist()).items())),
        )

    # --- persistence ----------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": FILE_FORMAT,
            "pos_dim": str(self.pos_dim),
            "byte_source": self.byte_source,
            "num_token_ids": str(self.num_token_ids),
            "fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint or "",
            "source": self.source or "",
        }

    def save(self, path: str | Path) -> Path:
        """Write a small safetensors file (atomically: temporary name, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(
            {"bytes": self.bytes.contiguous(), "lengths": self.lengths.contiguous()}, str(tmp), metadata=self.metadata()
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> ByteTable:
        """Read a saved table; the stored fingerprint must match its content (and `expected_fingerprint`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise KScaleError(
                "byte table file not found",
                where=str(path),
                fix="point to the byte_table.safetensors saved with the checkpoint",
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                table, lengths = f.get_tensor("bytes"), f.get_tensor("lengths")
        except Exception as e:
            raise KScaleError(
                f"corrupt byte table file ({e})",
                where=str(path),
                fix="rebuild it from the tokenizer with `kscale byte-table`",
            ) from None
        if meta.get("format") != FILE_FORMAT:
            raise KScaleError(f"not a byte table file (format {meta.get('format')!r})", where=str(path))
        t = cls(
            table,
            lengths,
            int(meta["pos_dim"]),
            byte_source=meta["byte_source"],
            num_token_ids=int(meta["num_token_ids"]),
            tokenizer_fingerprint=meta.get("tokenizer_fingerprint") or None,
            source=meta.get("source") or None,
        )
        if t.fingerprint != meta["fingerprint"]:
            raise KScaleError(
                f"byte table content does not match its stored fingerprint "
                f"(stored {meta['fingerprint'][:16]}, content {t.fingerprint[:16]}): file damaged",
                where=str(path),
                fix="rebuild it from the tokenizer",
            )
        if expected_fingerprint is not None:
            t.check_fingerprint(expected_fingerprint, where=str(path))
        return t

    def check_fingerprint(self, expected: str, where: str | None = None) -> None:
        if self.fingerprint != expected:
            raise KScaleError(
                f"byte table fingerprint mismatch: expected {expected}, found {self.fingerprint}",
                where=where or self.source,
                fix="the tokenizer (or pos_dim / byte_source) differs from the one the model was trained with; "
                "use the tokenizer and settings saved in the checkpoint's config",
            )

    def __repr__(self) -> str:
        return (
            f"ByteTable(vocab_size={self.vocab_size}, pos_dim={self.pos_dim}, byte_source={self.byte_source!r}, "
            f"fingerprint={self.fingerprint[:12]})"
        )
