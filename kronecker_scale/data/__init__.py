"""Data: prepared MDS datasets (prepare.py), the streaming loader (loader.py), the demo corpus
(corpus.py) and tokenizer training (tokenizer_training.py). streaming's quirks live in
streaming_adapter.py alone."""
from .loader import DataSource, TokenLoader, build_loader, check_manifest
from .prepare import prepare_data, read_manifest

__all__ = ["DataSource", "TokenLoader", "build_loader", "check_manifest", "prepare_data", "read_manifest"]
