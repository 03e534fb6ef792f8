"""Data: prepared MDS datasets (prepare.py), the streaming loader (loader.py), the demo corpus
(corpus.py) and tokenizer training (tokenizer_training.py). streaming's quirks live in
streaming_adapter.py alone."""

from .corpus import build_demo_corpus, verify_corpus
from .loader import DataSource, TokenLoader, build_loader, check_manifest
from .prepare import prepare_data, read_manifest
from .tokenizer_training import cut_tiktoken, train_bpe

__all__ = [
    "DataSource",
    "TokenLoader",
    "build_demo_corpus",
    "build_loader",
    "check_manifest",
    "cut_tiktoken",
    "prepare_data",
    "read_manifest",
    "train_bpe",
    "verify_corpus",
]
