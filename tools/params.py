#!/usr/bin/env python
"""Same as `kscale params`, for running from a checkout: python tools/params.py --help"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kronecker_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["params", *sys.argv[1:]]))
