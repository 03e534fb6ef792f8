"""Triton kernels for the Kronecker embedding, installed as `kronecker_scale.kernels`.

(Filled by the kernels issue; a top-level import named `kernels` would shadow the package of that
name that transformers probes for, hence the install-time rename.)
"""
