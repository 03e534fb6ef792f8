"""Triton kernels for the Kronecker embedding, installed as `kronecker_scale.kernels`.

Layout (Liger-Kernel's): `kronecker_embedding.py` holds the kernels, their autograd function
(`KroneckerEmbeddingFunction`), the functional entry point (`kronecker_embedding_triton`) and the colsum(W)
cache (`cached_colsum`, `clear_colsum_cache`: S is recomputed once per optimizer step); the module
that uses them is kronecker_scale.embedding.KroneckerEmbedding (impl="triton"). The torch reference they
are tested against lives in the test, tests/test_kernels.py (fp64, straight from the definition); the
benchmark is benchmarks/embedding.py (`kscale bench embedding`). On a machine without a GPU the kernels
run only in Triton's interpreter (TRITON_INTERPRET=1 set before this package is imported).

(A top-level import named `kernels` would shadow the package of that name that transformers probes
for, hence the install-time name.)
"""

from .kronecker_embedding import (
    KroneckerEmbeddingFunction,
    cached_colsum,
    clear_colsum_cache,
    kronecker_embedding_triton,
)

__all__ = ["KroneckerEmbeddingFunction", "cached_colsum", "clear_colsum_cache", "kronecker_embedding_triton"]
