"""Tokenizer files: one interface over Hugging Face, tiktoken, Tekken and SentencePiece formats."""

from .formats import FORMATS, TokenizerFile, gpt2_byte_to_unicode, load_tokenizer

__all__ = ["FORMATS", "TokenizerFile", "gpt2_byte_to_unicode", "load_tokenizer"]
