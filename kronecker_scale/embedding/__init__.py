"""Byte tables, the codec (closed form: codec.py; materialised reference: reference.py) and the
single-device KroneckerEmbedding (kronecker_embedding.py)."""

from .byte_table import BYTE_SOURCES, ByteTable, ByteTableStats, utf8_safe_truncate
from .codec import codec_dim, kronecker_embed_torch, scale_tables
from .kronecker_embedding import IMPLS, KroneckerEmbedding, check_token_ids
from .reference import dense_codec, kronecker_embed_dense

__all__ = [
    "BYTE_SOURCES",
    "ByteTable",
    "ByteTableStats",
    "IMPLS",
    "KroneckerEmbedding",
    "check_token_ids",
    "codec_dim",
    "dense_codec",
    "kronecker_embed_dense",
    "kronecker_embed_torch",
    "scale_tables",
    "utf8_safe_truncate",
]
