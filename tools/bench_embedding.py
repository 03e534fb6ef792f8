#!/usr/bin/env python
"""Same as `kscale bench embedding`, for running from a checkout: python tools/bench_embedding.py --help

A thin wrapper: the benchmark is benchmarks/embedding.py (installed as kronecker_scale.benchmarks, like
kernels/ as kronecker_scale.kernels); the command line is kronecker_scale/cli.py's `bench`.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import kronecker_scale  # noqa: E402

if importlib.util.find_spec("kronecker_scale.benchmarks") is None:  # a checkout that was never installed:
    kronecker_scale.__path__.append(str(REPO))  # benchmarks/ and kernels/ from here
from kronecker_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "embedding", *sys.argv[1:]]))
