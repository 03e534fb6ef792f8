"""Triton kernels for the Kronecker embedding, installed as `kronecker_scale.kernels`.

Layout (Liger-Kernel's): the kernels and their autograd function live in `kronecker_embedding.py`;
the torch reference they are tested against is `kronecker_scale.embedding.kronecker_embed_torch`
(tests/test_kernels.py); the benchmark is tools/bench_embedding.py. On a machine without a GPU the
kernels run only in Triton's interpreter (TRITON_INTERPRET=1 set before this package is imported).

(A top-level import named `kernels` would shadow the package of that name that transformers probes
for, hence the install-time name.)
"""
from .kronecker_embedding import KroneckerEmbeddingFunction, kronecker_embedding_triton

__all__ = ["KroneckerEmbeddingFunction", "kronecker_embedding_triton"]
