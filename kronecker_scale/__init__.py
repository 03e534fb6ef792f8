"""kronecker-scale: distributed pretraining of GPT models with Kronecker (byte-code) input embeddings."""

__version__ = "0.1.0"
