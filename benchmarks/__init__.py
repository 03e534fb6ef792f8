"""Benchmarks (tools, not tests, not library code), installed as `kronecker_scale.benchmarks`.

Nothing in the runtime package imports these; `kscale bench ...` (kronecker_scale/cli.py) and
tools/bench_embedding.py run them. Ratios are taken within one run; absolute figures only from a GPU.

- embedding.py:    the Kronecker embedding's implementations (torch closed form, dense reference, Triton
                   kernels) against nn.Embedding(131072, d): time and memory kept for backward;
- tp_embedding.py: the two tensor-parallel layouts of the projection: time and bytes communicated;
- prepare.py:      tokenization throughput of `kscale prepare-data`.
- step.py:         the whole training step (megatron engine) by attention backend and precision.
"""
